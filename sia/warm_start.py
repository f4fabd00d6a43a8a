"""Warm start of a diffusion run: copy the tensors of another UNet whose key and shape match.

`sia train --init-from` accepts a diffusers UNet2DModel or pipeline folder, a Hub id, a
.safetensors file or an ADM/guided-diffusion `.pt` checkpoint (converted to diffusers names). What
could not be copied is reported rather than silently left random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import InputError


def _hub_state_dict(repo_id: str) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DModel

    errors = []
    for subfolder in ("unet", None):
        try:
            return UNet2DModel.from_pretrained(repo_id, subfolder=subfolder).state_dict()
        except Exception as err:  # not found / offline / wrong layout: try the next place
            errors.append(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    raise InputError(f"`init_from` {repo_id}: not a UNet2DModel folder, pipeline folder, weights file or "
                     f"reachable Hub repo ({errors[-1]})")


def _folder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for base in (folder / "unet", folder):
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
            if (base / name).is_file():
                return load_file(str(base / name))
        if (base / "config.json").is_file():
            from diffusers import UNet2DModel

            return UNet2DModel.from_pretrained(base).state_dict()
    raise InputError(f"`init_from` {folder}: expected a UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors) "
                     "or a pipeline folder with unet/")


def _file_state_dict(path: Path, target_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from .convert import adm_to_diffusers_state_dict, adm_unet_config, load_official_checkpoint, strip_prefix

    state, metadata = load_official_checkpoint(path)
    if "input_blocks.0.0.weight" in state:  # guided-diffusion / official SDAS layout: convert the names
        # The source's attention heads (they order its qkv rows) come from its arch or the released
        # layout; when neither tells, the target UNet's head width is the best initialisation.
        config = adm_unet_config(state, sample_size=target_config["sample_size"], source=str(path), metadata=metadata,
                                 fallback_head_channels=target_config.get("attention_head_dim") or 64)
        return adm_to_diffusers_state_dict(state, config, source=str(path))
    return strip_prefix(state, "module.")


def load_init_state_dict(source: str, target_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights named like `UNet2DModel` keys from a folder, Hub id, .safetensors or ADM .pt file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_state_dict(path)
    if path.is_file():
        return _file_state_dict(path, target_config)
    if path.suffix in (".pt", ".pth", ".tar", ".safetensors", ".bin") or source.startswith((".", "/", "~")):
        raise InputError(f"`init_from` {source}: no such file or folder")
    return _hub_state_dict(source)


def load_matching_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> dict[str, Any]:
    """Copy every tensor whose key and shape match; return a report of what was skipped and why."""
    target = model.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    shape_mismatch = {k: {"source": list(state_dict[k].shape), "target": list(target[k].shape)}
                      for k in sorted(set(state_dict) & set(target)) if k not in matched}
    missing = sorted(set(target) - set(state_dict))
    unused = sorted(set(state_dict) - set(target))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in matched.items()}, strict=False)
    return {
        "source": source,
        "loaded": len(matched),
        "target_keys": len(target),
        "skipped_shape_mismatch": shape_mismatch,
        "missing_in_source": missing,
        "unused_source_keys": unused,
    }


def describe_init_report(report: dict[str, Any]) -> str:
    lines = [f"init from {report['source']}: loaded {report['loaded']}/{report['target_keys']} tensors"]
    for key, shapes in report["skipped_shape_mismatch"].items():
        lines.append(f"  skipped (shape {tuple(shapes['source'])} vs {tuple(shapes['target'])}): {key}")
    if report["missing_in_source"]:
        lines.append(f"  kept random (not in source, {len(report['missing_in_source'])}): "
                     + ", ".join(report["missing_in_source"][:8]) + (" ..." if len(report["missing_in_source"]) > 8 else ""))
    if report["unused_source_keys"]:
        lines.append(f"  unused source tensors ({len(report['unused_source_keys'])}): "
                     + ", ".join(report["unused_source_keys"][:8]) + (" ..." if len(report["unused_source_keys"]) > 8 else ""))
    return "\n".join(lines)

