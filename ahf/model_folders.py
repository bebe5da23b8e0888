"""Model folders are untrusted input: nothing in one may run code on the user's machine.

transformers runs a folder's own Python when its configs carry an `auto_map` (and asks, or is told,
to trust it), and `torch.load` of pickle weights can run anything. `check_model_folder` refuses both
before any library reads the folder; `SAFE_LOADING` goes to every `from_pretrained`, so a hub name or
a mixed folder never falls back to a pickle or to remote code either. Used by training (backbones,
tokenizers, merge bases) and by the index's dense encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ahf.console import UserError

# Unpickling can run code, and so can a folder's own modules: safetensors only, no code from folders.
SAFE_LOADING = {"trust_remote_code": False, "use_safetensors": True}
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def check_model_folder(name_or_path: str | Path, weights: bool = True) -> None:
    """Refuse a local model folder that would make transformers run its code or unpickle its weights
    (`weights`: the caller loads them), before transformers reads it. A sentence-transformers folder is
    checked with each module's folder. Hub names pass: `SAFE_LOADING` on every load covers them."""
    root = Path(name_or_path)
    if not root.is_dir():
        return
    for folder in _module_folders(root):
        _refuse_custom_code(folder)
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
        if weights and pickles and not any(folder.glob("*.safetensors")):
            raise UserError(
                f"{folder}: holds pickle weights ({', '.join(pickles[:3])}) and no *.safetensors; ahf loads "
                "safetensors only (unpickling can run code). Convert them on a trusted machine: "
                "AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: transformers will say so when it loads
        return None


def _module_folders(root: Path) -> list[Path]:
    """`root`, and the module folders its sentence-transformers `modules.json` names; a module class
    from outside sentence-transformers is refused (importing it runs code the folder chose)."""
    modules = _read_json(root / "modules.json")
    folders = [root]
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if not kind.startswith("sentence_transformers."):
            raise UserError(f"{root}: modules.json names the module class {kind!r}, which is not part of "
                            "sentence-transformers; ahf does not run code from model folders")
        folders.append(root / str(module.get("path", "")))
    return list(dict.fromkeys(folders))


def _refuse_custom_code(folder: Path) -> None:
    for name in CODE_CONFIGS:
        config = _read_json(folder / name)
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            raise UserError(f"{folder}: {name} maps to custom code ({json.dumps(auto_map)}); ahf does not run "
                            "code from model folders (trust_remote_code is off): use a model of an "
                            "architecture transformers ships")
