"""wandb dashboards, offline: training loss/lr/grad-norm, sampling grids with captions, the
per-step guidance trace, eval metrics grouped by sweep and the sweep heatmaps. The same numbers
reach the CSV (and TensorBoard) loggers.

Offline runs are read back from their ``run-*.wandb`` file (LevelDB-style log of protobuf
records; wandb 0.31 ships no Python reader for it, so a small one is below).
"""

from __future__ import annotations

import csv
import json
import struct
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from idgen.models import build_tiny_sd
from idgen.sample import sample
from idgen.toyworld.demo import DemoDomainDataModule
from tests.conftest import compose_config, quiet_trainer, tiny_finetune_module


@pytest.fixture(autouse=True)
def no_active_wandb_run():
    """A run left open by an earlier test would swallow ours (WandbLogger reuses ``wandb.run``)."""
    import wandb

    wandb.finish()
    yield
    wandb.finish()


BLOCK = 32768  # wandb's record log: 32 KiB blocks, 7-byte record headers (leveldb log format)


def wandb_records(path: Path):
    """Protobuf ``Record`` objects of an offline ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first vs middle/last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_run(run_dir: Path, wait_s: float = 20.0) -> dict:
    """{"id", "group", "name", "config": {key: value}, "history": [{key: value} per log call]}
    of one offline run.

    wandb's service process writes the file; its last records (up to "exit") may land a moment
    after ``finish()`` returns, so wait for them.
    """
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    records = list(wandb_records(path))
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{path}: the run never finished"
        time.sleep(0.2)
        records = list(wandb_records(path))
    out: dict = {"id": None, "group": None, "name": None, "config": {}, "history": []}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, group=record.run.run_group)
            out["name"] = record.run.display_name
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            row = {
                "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                for item in record.history.item
            }
            out["history"].append(row)
    return out


def offline_runs(root: Path) -> list[dict]:
    return [read_run(d) for d in sorted(root.rglob("offline-run-*")) if d.is_dir()]


def history_keys(run: dict) -> set[str]:
    """Logged keys; media are stored flattened (``key/_type``, ``key/captions``): their prefixes."""
    keys = {k for row in run["history"] for k in row}
    return keys | {k.rsplit("/", 1)[0] for k in keys if "/_" in k or k.endswith("/captions")}


def test_training_logs_loss_lr_and_grad_norm(tmp_path):
    sd = build_tiny_sd(seed=0)
    module = tiny_finetune_module(tmp_path / "out", sd, domain="shapes")
    expected: list[float] = []

    class NormProbe(L.Callback):  # the same total, computed from the module's parameters
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
            expected.append(float(torch.cat(grads).double().norm()))

    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="idgen-test")
    csv_logger = CSVLogger(str(tmp_path), name="csv", version="")
    trainer = quiet_trainer(
        tmp_path,
        3,
        logger=[wandb_logger, csv_logger],
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step"), NormProbe()],
        limit_val_batches=0,
    )
    data = DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=4, batch_size=2)
    trainer.fit(module, datamodule=data)
    wandb_logger.experiment.finish()

    (run,) = offline_runs(tmp_path / "wandb")
    assert {"train/loss", "train/grad_norm", "lr-AdamW"} <= history_keys(run)
    logged = [row["train/grad_norm"] for row in run["history"] if "train/grad_norm" in row]
    assert logged == [pytest_approx(v) for v in expected] and len(expected) == 3
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    from_csv = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert from_csv == [pytest_approx(v) for v in expected]


def pytest_approx(v: float):
    return pytest.approx(v, rel=1e-4)  # float32 reductions in another order


def test_sampling_logs_captioned_grids_and_guidance_trace(tmp_path):
    overrides = [
        "logger=many_loggers",
        "prompts=[a photo of a red circle,a photo of a blue square]",
        "images_per_prompt=2",
        "batch_size=2",
        "sampler=cfg",
        "sampler.w_c=4.0",
        "sampler.num_inference_steps=3",
    ]
    cfg = compose_config("sample", tmp_path, overrides)
    sample(cfg)
    run_dir = Path(cfg.paths.output_dir)

    # 1. wandb: two captioned grids, the per-step series and the trace table
    (run,) = offline_runs(run_dir / "wandb")
    grid_rows = [r for r in run["history"] if "samples/grid/captions" in r]
    assert len(grid_rows) == 1 and grid_rows[0]["samples/grid/count"] == 2
    captions = grid_rows[0]["samples/grid/captions"]
    assert captions[0].startswith("a photo of a red circle | seeds 0..1 | cfg w_d=0.0, w_c=4.0")
    assert captions[1].startswith("a photo of a blue square | seeds 2..3")
    assert "used: control=4" in captions[0]
    series = [r for r in run["history"] if "guidance/control/weight" in r]
    assert len(series) == 3  # one row per denoising step
    assert all(r["guidance/control/weight"] == 4.0 for r in series)
    assert all(r["guidance/uncond/pred_norm"] > 0 for r in series)
    assert [r["trainer/global_step"] for r in series] == [0, 1, 2]
    assert "guidance/trace" in history_keys(run)

    # 2. the prediction norms are those of the frozen SD's predictions at each step
    records = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4
    first = series[0]
    sd = build_tiny_sd(seed=0)
    latents = torch.cat(
        [
            torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(r["seed"]))
            for r in records
        ]
    )
    from idgen.pipelines.in_domain import make_scheduler

    scheduler = make_scheduler(sd.scheduler.config, "dpm++")
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    assert first["guidance/timestep"] == int(t)
    x = scheduler.scale_model_input(latents * scheduler.init_noise_sigma, t)
    texts = [""] * 4 + [r["prompt"] for r in records]
    ids = sd.tokenizer(texts, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = sd.text_encoder(ids)[0]
        eps = sd.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
    norms = eps.flatten(1).norm(dim=1)
    assert first["guidance/uncond/pred_norm"] == pytest_approx(float(norms[:4].mean()))
    assert first["guidance/control/pred_norm"] == pytest_approx(float(norms[4:].mean()))

    # 3. the same series in the CSV logger and TensorBoard
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    csv_weights = [
        float(r["guidance/control/weight"]) for r in rows if r["guidance/control/weight"]
    ]
    assert csv_weights == [4.0, 4.0, 4.0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert "guidance/control/pred_norm" in events.Tags()["scalars"]
    assert {"samples/grid/0", "samples/grid/1"} <= set(events.Tags()["images"])


def test_eval_sweep_runs_grouped_and_heatmaps_logged(tmp_path, stand_in_sweep):
    """A 2-job grid with the wandb logger: each job's metrics in a run of the sweep's group."""
    sweep = tmp_path / "sweep_a"
    stand_in_sweep(
        "guidance_grid", sweep, "logger=wandb", "metrics.fid.kid=false", "sample.w_d=0,2",
        "sample.w_c=1",
    )  # fmt: skip

    runs = offline_runs(sweep)
    jobs = [r for r in runs if r["name"] != "sweep-summary"]
    assert len(jobs) == 2 and all(r["group"] == "sweep_a" for r in runs)
    fids = sorted(row["eval/fid"] for r in jobs for row in r["history"] if "eval/fid" in row)
    expected = sorted(json.loads((sweep / j / "metrics.json").read_text())["fid"] for j in "01")
    assert fids == [pytest_approx(v) for v in expected]
    (summary,) = [r for r in runs if r["name"] == "sweep-summary"]
    keys = history_keys(summary)
    assert {"sweep/heatmap_fid", "sweep/summary"} <= keys
