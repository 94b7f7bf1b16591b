"""idgen: in-domain generation on Stable Diffusion 1.5 from a folder of unlabeled images."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra config tree ships inside the package, so a wheel install finds it too.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def _register_resolvers() -> None:
    # `${idgen.package_dir:}` in configs: files shipped inside the package (the toy base)
    # without writing any machine's absolute path into the configs.
    from omegaconf import ListConfig, OmegaConf

    if not OmegaConf.has_resolver("idgen.package_dir"):
        OmegaConf.register_new_resolver(
            "idgen.package_dir", lambda: str(Path(__file__).resolve().parent)
        )
    # `${idgen.concat:[a],${b}}`: one list from several (preview = domain prompt + control prompts)
    if not OmegaConf.has_resolver("idgen.concat"):
        OmegaConf.register_new_resolver(
            "idgen.concat", lambda *lists: ListConfig([item for items in lists for item in items])
        )


_register_resolvers()


def _quiet() -> None:
    from idgen.utils.quiet import quiet_libraries  # Lightning's tips and repeated banners off

    quiet_libraries()


_quiet()
