import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from idgen.data import DomainImageDataModule, SkippedImagesWarning, load_rgb
from idgen.data import datamodule as dm_module
from idgen.toyworld.demo import DemoDomainDataModule, make_demo_domain


def _rgb(w=48, h=40, colour=(200, 30, 30)):
    return Image.new("RGB", (w, h), colour)


def make_messy_folder(root):
    """Every kind of file a real folder holds; returns the relative paths that must be used."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    good = []

    def add(rel, image, **kw):
        image.save(root / rel, **kw)
        good.append(rel)

    add("a.jpg", _rgb(), quality=95)
    add("b.png", _rgb())
    add("c.webp", _rgb())
    add("d.bmp", _rgb())
    add("e.tiff", _rgb())
    add("sub/gray.png", Image.new("L", (40, 40), 128))
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] * 256)
    add("sub/palette.png", palette)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent -> white
    add("sub/rgba.png", rgba)
    add("sub/la.png", Image.new("LA", (40, 40), (0, 0)))
    add("sub/deeper/cmyk.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)))
    sixteen = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    add("sub/deeper/sixteen.png", sixteen)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    add("rotated.jpg", _rgb(60, 30), exif=exif.tobytes())
    add("UPPER.PNG", _rgb())

    # Bad files: must all be skipped with one warning.
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 10)
    png_bytes = (root / "b.png").read_bytes()
    big = _rgb(64, 64)
    big.putdata([(i % 256, (i * 7) % 256, 3) for i in range(64 * 64)])
    big.save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "full.png").unlink()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("hello, I am a text file with an image extension")
    os.symlink(root / "does-not-exist.png", root / "broken_link.png")
    (root / "notes.txt").write_text("ignored: not an image extension")
    (root / ".hidden.png").write_bytes(png_bytes)  # hidden files are ignored
    bad = ["corrupt.jpg", "truncated.png", "zero.png", "text.png", "broken_link.png"]
    return sorted(good), bad


def test_load_rgb_conversions(tmp_path):
    make_messy_folder(tmp_path)
    assert load_rgb(tmp_path / "sub/rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(tmp_path / "sub/la.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(tmp_path / "sub/palette.png").getpixel((0, 0)) == (255, 0, 0)
    assert load_rgb(tmp_path / "sub/gray.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(tmp_path / "sub/deeper/sixteen.png").getpixel((0, 0)) == (255, 255, 255)
    r, g, b = load_rgb(tmp_path / "sub/deeper/cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert load_rgb(tmp_path / "rotated.jpg").size == (30, 60)  # EXIF orientation applied


def test_datamodule_yields_exactly_the_good_files(tmp_path):
    root = tmp_path / "images"
    good, bad = make_messy_folder(root)
    dm = DomainImageDataModule(
        root=str(root), resolution=32, batch_size=4, manifest_path=str(tmp_path / "m.txt")
    )
    with pytest.warns(SkippedImagesWarning) as record:
        dm.setup("fit")
    assert len(record) == 1
    message = str(record[0].message)
    assert f"Skipped {len(bad)} unusable" in message and str(root) in message
    used = sorted(p.relative_to(root).as_posix() for p in dm.train_files)
    assert used == good
    assert sorted(p.relative_to(root).as_posix() for p, _ in dm.skipped) == sorted(bad)

    batches = list(dm.train_dataloader())
    assert sum(len(b["index"]) for b in batches) == len(good) // 4 * 4  # drop_last
    seen = torch.cat([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen)
    for batch in batches:
        x = batch["pixel_values"]
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0

    manifest = (tmp_path / "m.txt").read_text().splitlines()
    assert [line.split("\t")[1] for line in manifest if line.startswith("train\t")] == [
        p.relative_to(root).as_posix() for p in dm.train_files
    ]


def test_order_is_deterministic_and_sorted(tmp_path):
    root = tmp_path / "images"
    make_messy_folder(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        a = DomainImageDataModule(root=str(root), resolution=16)
        b = DomainImageDataModule(root=str(root), resolution=16)
        a.setup(), b.setup()
    assert a.train_files == b.train_files
    rel = [p.relative_to(root).as_posix() for p in a.train_files]
    assert rel == sorted(rel)


def test_min_size_skip_and_upscale(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _rgb(100, 100).save(root / "big.png")
    _rgb(20, 30).save(root / "small.png")
    skip = DomainImageDataModule(
        root=str(root), resolution=64, min_size=64, small_images="skip", batch_size=1
    )
    with pytest.warns(SkippedImagesWarning, match="small.png"):
        skip.setup()
    assert [p.name for p in skip.train_files] == ["big.png"]
    upscale = DomainImageDataModule(root=str(root), resolution=64, min_size=64, batch_size=1)
    upscale.setup()
    assert len(upscale.train_files) == 2
    assert upscale.train_dataset[1]["pixel_values"].shape == (3, 64, 64)


def test_max_images_and_val_split_are_seeded_and_disjoint(tmp_path):
    root = make_demo_domain(tmp_path / "demo", num_images=40, resolution=16, seed=1)
    kw = dict(root=str(root), resolution=16, max_images=30, val_fraction=0.2)
    a, b, c = (DomainImageDataModule(seed=s, **kw) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert len(a.train_files) == 24 and len(a.val_files) == 6
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert not set(a.train_files) & set(a.val_files)
    assert (a.train_files, a.val_files) != (c.train_files, c.val_files)
    assert len(next(iter(a.val_dataloader()))["pixel_values"]) == 4


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DomainImageDataModule(root=str(tmp_path / "missing")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        DomainImageDataModule(root=str(tmp_path / "empty")).setup()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.warns(SkippedImagesWarning), pytest.raises(ValueError, match="none is usable"):
        DomainImageDataModule(root=str(tmp_path / "bad")).setup()
    with pytest.raises(ValueError, match="small_images"):
        DomainImageDataModule(root=str(tmp_path), small_images="shrink")


def test_scan_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_demo_domain(tmp_path / "demo", num_images=6, resolution=16)
    cache = tmp_path / "cache"
    first = DomainImageDataModule(root=str(root), resolution=16, scan_cache_dir=str(cache))
    first.setup()

    def no_decoding(*a, **k):
        raise AssertionError("the scan cache should have been used")

    monkeypatch.setattr(dm_module, "check_images", no_decoding)
    second = DomainImageDataModule(root=str(root), resolution=16, scan_cache_dir=str(cache))
    second.setup()
    assert second.train_files == first.train_files
    _rgb(16, 16).save(root / "new.png")  # a changed folder is scanned again
    with pytest.raises(AssertionError, match="scan cache"):
        DomainImageDataModule(root=str(root), resolution=16, scan_cache_dir=str(cache)).setup()


def test_demo_domain_is_deterministic_dark_and_idempotent(tmp_path):
    a = make_demo_domain(tmp_path / "a", num_images=8, resolution=32, seed=3)
    b = make_demo_domain(tmp_path / "b", num_images=8, resolution=32, seed=3)
    files_a, files_b = sorted(a.glob("*.png")), sorted(b.glob("*.png"))
    assert [f.name for f in files_a] == [f.name for f in files_b] and len(files_a) == 8
    assert all(f1.read_bytes() == f2.read_bytes() for f1, f2 in zip(files_a, files_b, strict=True))
    for f in files_a:
        image = np.asarray(Image.open(f))
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert np.median(border) < 40  # dark background
        assert image.max() > 150  # a bright object
    mtime = files_a[0].stat().st_mtime_ns
    make_demo_domain(tmp_path / "a", num_images=8, resolution=32, seed=3)
    assert files_a[0].stat().st_mtime_ns == mtime


def test_demo_datamodule_generates_on_setup(tmp_path):
    dm = DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=12, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_files) == 12
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (4, 3, 64, 64)


def test_latent_cache_matches_on_the_fly_encoding(tmp_path, tiny_sd):
    from idgen.data.latents import latents_from_batch

    root = make_demo_domain(tmp_path / "demo", num_images=6, resolution=64)
    kw = dict(root=str(root), resolution=64, batch_size=6, random_flip=False)
    plain = DomainImageDataModule(**kw)
    cached = DomainImageDataModule(cache_latents=True, latent_cache_dir=str(tmp_path / "lat"), **kw)
    for dm in (plain, cached):
        dm.setup("fit")
        dm.attach_vae(tiny_sd.vae, "tiny-0")
    assert len(list((tmp_path / "lat").glob("latents-*.safetensors"))) == 1
    batch_plain = next(iter(plain.train_dataloader()))
    batch_cached = next(iter(cached.train_dataloader()))
    assert "pixel_values" in batch_plain and "latent_params" in batch_cached
    order = batch_plain["index"].argsort()
    order_c = batch_cached["index"].argsort()
    with torch.no_grad():
        z_plain = latents_from_batch(batch_plain, tiny_sd.vae, torch.Generator().manual_seed(0))
        z_cached = latents_from_batch(batch_cached, tiny_sd.vae, torch.Generator().manual_seed(0))
    # Same images in a different shuffle order: compare the distribution means per image.
    mean_plain = tiny_sd.vae.encode(batch_plain["pixel_values"]).latent_dist.mean[order]
    mean_cached = batch_cached["latent_params"][order_c, :4]
    torch.testing.assert_close(mean_cached, mean_plain, atol=1e-5, rtol=1e-5)
    assert z_plain.shape == z_cached.shape == (6, 4, 8, 8)

    # The second run reads the cache instead of encoding.
    again = DomainImageDataModule(cache_latents=True, latent_cache_dir=str(tmp_path / "lat"), **kw)
    again.setup("fit")
    calls = []
    tiny_sd.vae.encode = lambda *a, **k: calls.append(1)  # would break if called
    again.attach_vae(tiny_sd.vae, "tiny-0")
    assert not calls


def test_latent_cache_needs_center_crop(tmp_path):
    with pytest.raises(ValueError, match="center_crop"):
        DomainImageDataModule(
            root=str(tmp_path), cache_latents=True, latent_cache_dir="x", center_crop=False
        )


def test_shuffle_order_is_per_epoch_and_reproducible_after_resume(tmp_path):
    root = make_demo_domain(tmp_path / "demo", num_images=12, resolution=16)
    dm = DomainImageDataModule(root=str(root), resolution=16, batch_size=12, seed=3)
    dm.setup()

    def order(epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
        return next(iter(loader))["index"].tolist()

    first, second = order(0), order(1)
    assert sorted(first) == list(range(12)) and first != second
    # A fresh loader (a resumed run) set to epoch 1 gives epoch 1's order, not epoch 0's.
    assert order(1) == second
