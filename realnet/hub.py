"""Loading a saved RealNet from a model folder or the Hugging Face Hub.

`RealNet.from_pretrained` delegates here. Loading never unpickles and never fetches backbone
weights (the saved ``model.safetensors`` holds the whole network), and every way a location can
be wrong (no such folder, an invalid repo id, a repo, revision or file the Hub or the offline
cache does not have, a config or weights file that does not fit) is a one-line InputError naming
it, instead of a Hub or torch traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from torch import nn

from sia.errors import InputError, read_json_object

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LOCATION = "pretrained_model_name_or_path"
# What the Hub client raises for a repo, revision or file it cannot get (offline: not cached).
HUB_ERRORS = (EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled)

Model = TypeVar("Model", bound=nn.Module)


def check_model_location(name: str) -> None:
    """Refuse early what is neither an existing model folder nor a syntactically valid Hub repo id,
    so a mistyped path is not sent to the Hub as a repo id."""
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise InputError(
            f"{LOCATION}: {name!r} is a file; expected a model folder ({CONFIG_NAME} + {WEIGHTS_NAME}) or a Hub repo id"
        )
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name:
        raise InputError(f"{LOCATION}: the folder {name!r} does not exist")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise InputError(
            f"{LOCATION}: {name!r} is neither an existing folder nor a valid Hub repo id ('name' or 'owner/name')"
        ) from None


def check_config_file(path: str) -> None:
    """A local config.json must be a JSON object; the Hub mixin would fail on anything else with a
    traceback that does not name the file."""
    if os.path.isfile(path):  # a missing one is reported further on
        read_json_object(path, "RealNet config")


def hub_input_error(model_id: str, revision: str | None, filename: str, err: BaseException) -> InputError:
    """One line saying which of repo, revision or file could not be had, instead of a Hub traceback."""
    where = f"{LOCATION}: {model_id!r}"
    if isinstance(err, RepositoryNotFoundError):
        return InputError(f"{where}: no such Hub repo, or it is private/gated (log in or pass token=)")
    if isinstance(err, RevisionNotFoundError):
        return InputError(f"{where}: revision {revision!r} not found on the Hub")
    if isinstance(err, LocalEntryNotFoundError):
        return InputError(
            f"{where}: {filename} is not in the local Hub cache and the Hub cannot be reached "
            "(offline, or no such repo/revision); no local folder has that name either"
        )
    if isinstance(err, EntryNotFoundError):
        return InputError(f"{where}: the repo has no {filename}")
    if isinstance(err, HFValidationError):
        return InputError(f"{where}: invalid Hub argument ({str(err).strip().splitlines()[0]})")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(f"{where}: cannot get {filename} from the Hub ({first})")


def check_location(name: str) -> None:
    """Everything about `name` that can be checked before the Hub mixin reads config.json."""
    check_model_location(name)
    if os.path.isdir(name):
        check_config_file(os.path.join(name, CONFIG_NAME))


@contextmanager
def hub_errors_as_input_errors(model_id: str, revision: str | None, filename: str) -> Iterator[None]:
    """Turn what the Hub client raises while getting `filename` into `hub_input_error`'s one line."""
    try:
        yield
    except HUB_ERRORS as err:
        raise hub_input_error(model_id, revision, filename, err) from None


def weights_file(
    model_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    force_download: bool,
    local_files_only: bool,
    token: str | bool | None,
) -> str:
    """The path of the model's ``model.safetensors``: in the folder, or from the Hub (or its cache).

    Resolved before the config is looked at: the mixin swallows Hub errors on config.json, so a
    missing repo would otherwise be reported as a missing config.
    """
    if os.path.isdir(model_id):
        path = os.path.join(model_id, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise InputError(f"{LOCATION}: {model_id!r} has no {WEIGHTS_NAME}")
        return path
    with hub_errors_as_input_errors(model_id, revision, WEIGHTS_NAME):
        return hf_hub_download(
            repo_id=model_id,
            filename=WEIGHTS_NAME,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )


def build_for_checkpoint(cls: type[Model], model_id: str, config: dict | None, settings: dict[str, Any]) -> Model:
    """An untrained `cls` shaped by the saved settings, its backbone built empty.

    ``weights_from_checkpoint=True`` tells the constructor that every weight comes from the
    checkpoint, so it neither downloads nor reads the backbone weights the settings may name.
    A config edited by hand or written for another model is one InputError naming the file.
    """
    if config is None:
        raise InputError(f"{LOCATION}: no {CONFIG_NAME} found for {model_id!r}")
    try:
        return cls(**{**settings, "weights_from_checkpoint": True})
    except (InputError, TypeError, ValueError) as err:
        where = os.path.join(model_id, CONFIG_NAME) if os.path.isdir(model_id) else f"{model_id!r} {CONFIG_NAME}"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{where}: not a valid RealNet config ({first})") from None


def load_weights_file(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load a safetensors state dict, reporting missing/unexpected/mis-shaped keys on one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{path}: not a readable safetensors weights file ({first})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")

    problems = []
    if wrong_shape:
        problems.append(f"shape mismatch: {listing(wrong_shape)}")
    if strict and missing:
        problems.append(f"missing keys: {listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if problems:
        raise InputError(f"{path}: checkpoint does not match the model config ({'; '.join(problems)})")
    model.load_state_dict(state, strict=strict)


def check_loaded(model: Any, path: str, strict: bool) -> None:
    """Refuse AFS indices that are out of range, or (strict) never selected: such a checkpoint
    would load and then compute maps from placeholder channels."""
    model.selector.check_indices(model.selector.indices(), source=f"{path}: AFS indices")
    if strict and not model.afs_ready:
        raise InputError(
            f"{path}: the model was saved before feature selection (AFS), so its channels are "
            "placeholders; run select_features (training does) before save_pretrained"
        )


def load_checkpoint(
    cls: type[Model],
    *,
    model_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    force_download: bool,
    local_files_only: bool,
    token: str | bool | None,
    map_location: str,
    strict: bool,
    config: dict | None,
    settings: dict[str, Any],
) -> Model:
    """Build `cls` from the saved settings and load ``model.safetensors`` into it (strictly by default).

    The arguments are those the Hub mixin hands to ``_from_pretrained``; `settings` are the
    constructor arguments it read from config.json. Returns the model in eval mode on `map_location`.
    """
    path = weights_file(model_id, revision, cache_dir, force_download, local_files_only, token)
    model = build_for_checkpoint(cls, model_id, config, settings)
    load_weights_file(model, path, strict=strict)
    check_loaded(model, path, strict)
    model.to(map_location)
    model.eval()
    return model
