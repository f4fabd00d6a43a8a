"""Generate an SDAS anomaly image set (SIA) as a Hugging Face `imagefolder` dataset.

Layout of the output folder (``datasets.load_dataset("imagefolder", data_dir=DIR)`` loads it)::

    DIR/<category>/000000.png ...      lossless PNG (the official release uses lossy JPEG)
    DIR/metadata.jsonl                 file_name, category, index, strength, seed, model, revision,
                                       sampler, steps, dtype (rebuilt atomically at the end of a run)
    DIR/.sia/settings.json             the settings of this folder; a run with other settings is refused
    DIR/.sia/records/<category>/*.json one record per finished image (what makes a run resumable)

Image ``i`` of a category is sampled with its own generator seeded ``seed + i`` (latents, its
strength and its step noise), so what each image is made of does not depend on the batch size or
on the number of processes, and any image can be regenerated alone. What batching can change is
float rounding: batched UNet kernels may differ in the last bits (about 1e-6), which moves a few
pixels of some images by one grey level; the same batch size on the same machine and thread
count writes the same bytes. Two consequences of this (required) seeding scheme:

* seeds of different runs overlap: image ``i`` of a run with ``seed=1`` is image ``i + 1`` of a run
  with ``seed=0``. To *extend* a set with new images, use a seed far from every earlier one, e.g.
  ``seed + 1_000_000`` (more than any ``num_images``), never ``seed + 1``;
* image ``i`` of every category starts from the same noise x_T (only the class label differs), so
  the categories of one set are not independent samples of the noise.

Runs launched with ``torchrun``/``accelerate launch`` split the images across processes
(`accelerate.PartialState`). An interrupted run resumes where it stopped: finished images are
skipped and every file is written to a temporary name first, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .devices import parse_device
from .errors import InputError, read_json_object, whole_number
from .paths import inside, separate_output, writable_folder_path
from .pipeline import SDASPipeline

__all__ = ["generate_dataset", "load_generation_pipeline", "resolve_model", "GenerationSummary", "parse_strength",
           "parse_categories", "parse_device", "strength_warning", "STRENGTH_WARN_ABOVE"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS_KEYS = ("model", "revision", "sampler", "steps", "strength", "seed", "dtype")
#: torch generators take seeds in [0, 2**64); every ``seed + i`` of a run must fit.
MAX_SEED = 2**64 - 1
#: Largest strength each sampler is meant for, with the range it was made for. The official SDAS
#: sampler draws s ~ U(0.1, 0.2); its DDIM variant is used with s in 0.01-0.03. Larger strengths
#: run, but every step's variance grows to (1 + s) times the model's, so the samples soon stop
#: looking like the product: above these limits a warning is logged.
STRENGTH_WARN_ABOVE = {"ddpm": (0.5, "0.1-0.2"), "ddim": (0.1, "0.01-0.03")}


@dataclass
class GenerationSummary:
    """What a run did: the dataset folder and image counts (this process's share for generated/skipped)."""

    output: Path
    generated: int
    skipped: int
    total: int
    metadata: Path | None


def parse_strength(values: float | str | Sequence[float | str]) -> tuple[float, ...]:
    """Normalise a strength spec to ``(s,)`` or ``(min, max)``; accepts ``0.15``, ``"0.1,0.2"``, ``[0.1, 0.2]``."""
    if isinstance(values, str):
        parts = [p for p in values.replace(",", " ").split() if p]
    elif isinstance(values, (int, float)):
        parts = [values]
    else:
        parts = list(values)
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise InputError(f"`strength` expects one or two numbers, got {values!r}") from None
    if len(numbers) not in (1, 2) or any(not (0 <= n < float("inf")) for n in numbers):
        raise InputError(f"`strength` expects one or two numbers >= 0, got {values!r}")
    if len(numbers) == 2:
        if numbers[0] > numbers[1]:
            raise InputError(f"`strength` min must not exceed max, got {values!r}")
        if numbers[0] == numbers[1]:
            numbers = numbers[:1]
    return numbers


def strength_warning(strengths: Sequence[float], sampler: str) -> str | None:
    """A one-line warning when the largest strength exceeds what `sampler` is meant for, else None."""
    limit, usual = STRENGTH_WARN_ABOVE.get(sampler.lower(), (None, None))
    if limit is None or max(strengths) <= limit:
        return None
    return (f"warning: `strength` {max(strengths):g} is above the range the {sampler.lower()} sampler is meant for "
            f"(official {usual}, warned above {limit:g}); the samples will hardly look like the product")


def parse_categories(values: str | Sequence[str]) -> list[str]:
    """Categories from repeated and/or comma-separated values, de-duplicated in order."""
    items = [values] if isinstance(values, str) else list(values)
    names = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not names:
        raise InputError("`categories` needs at least one category name")
    return list(dict.fromkeys(names))


def resolve_model(model: str | os.PathLike | None, categories: Sequence[str]) -> str:
    """The model to load: a folder or Hub id as given, or a benchmark's default SDAS pipeline.

    ``None`` picks the default pipeline of the benchmark the categories belong to (``bottle`` ->
    MVTec AD); a benchmark name (``mvtec-ad``, ``visa``, ...) that is not a local folder does the same.
    """
    from .categories import DATASET_ALIASES, resolve_category
    from .hub import sdas_repo_id

    if model is not None:
        text = os.fspath(model)
        if not Path(text).exists() and text.strip().lower() in DATASET_ALIASES:
            return sdas_repo_id(text)
        return text
    datasets = set()
    for name in categories:
        try:
            datasets.add(resolve_category(name)[0])
        except InputError:
            raise InputError(f"`model` is needed for category {name!r}: it belongs to no benchmark with a default "
                             "SDAS pipeline (train one with `sia train`)") from None
    if len(datasets) != 1:
        raise InputError(f"`model` is needed: the categories belong to several benchmarks ({', '.join(sorted(datasets))})")
    return sdas_repo_id(datasets.pop())


def load_generation_pipeline(model: str | os.PathLike, revision: str | None = None, device: str | torch.device | None = None,
                             dtype: str = "float32") -> tuple[SDASPipeline, str, str | None]:
    """Load an `SDASPipeline` from a folder or Hub id; returns (pipeline, model id, resolved revision).

    For Hub ids the revision recorded is the commit hash of the downloaded snapshot, so a dataset
    says exactly which weights made it.
    """
    if dtype not in DTYPES:
        raise InputError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(model)
    if path.is_dir():
        if revision is not None:
            raise InputError(f"`revision` applies to Hub ids only, but `model` {model} is a local folder")
        if not (path / "model_index.json").is_file():
            raise InputError(f"`model` {model}: folder has no model_index.json (expected a saved SDASPipeline)")
        folder, model_id, resolved = path, str(path.resolve()), None
    else:
        try:
            folder = Path(SDASPipeline.download(str(model), revision=revision))
        except Exception as err:  # noqa: BLE001 - any hub/network failure means the same to the user
            raise InputError(f"`model` {model}: not a local folder and not loadable from the Hub ({type(err).__name__}); "
                             "train a pipeline with `sia train` or convert the official checkpoint with "
                             "`sia convert-official`, then pass its folder") from None
        model_id = str(model)
        resolved = folder.name if folder.parent.name == "snapshots" else revision
    pipe = SDASPipeline.from_pretrained(folder, dtype=DTYPES[dtype])
    if device is not None:
        pipe = pipe.to(device)
    return pipe, model_id, resolved


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _check_settings(settings_path: Path, settings: dict, keys: Sequence[str] = SETTINGS_KEYS) -> bool:
    """True when the folder already has settings (equal ones); InputError naming the differences otherwise."""
    if not settings_path.is_file():
        return False
    existing = read_json_object(settings_path, "settings of this dataset folder", advice="fix or delete it")
    diffs = [f"{k}: existing {existing.get(k)!r} vs requested {settings[k]!r}"
             for k in keys if existing.get(k) != settings[k]]
    if diffs:
        raise InputError(f"`output` {settings_path.parent.parent} was generated with other settings ({'; '.join(diffs)}); "
                         "use a new folder or the same settings")
    return True


def _rebuild_metadata(output: Path) -> Path:
    records_dir = output / ".sia" / "records"
    lines = []
    for record_path in sorted(records_dir.glob("*/*.json")):
        record = read_json_object(record_path, "image record", advice="fix or delete it")
        if (output / str(record.get("file_name", ""))).is_file():
            lines.append(json.dumps(record, sort_keys=True))
    metadata = output / "metadata.jsonl"
    _write_text_atomic(metadata, "\n".join(lines) + ("\n" if lines else ""))
    return metadata


def generate_dataset(
    model: str | os.PathLike | None,
    output: str | os.PathLike,
    categories: str | Sequence[str],
    num_images: int,
    strength: float | str | Sequence[float] = (0.1, 0.2),
    seed: int = 0,
    batch_size: int = 16,
    steps: int = 20,
    sampler: str = "ddpm",
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    progress: bool = True,
    on_image_saved: Callable[[dict], None] | None = None,
) -> GenerationSummary:
    """Sample `num_images` SDAS images per category into an imagefolder dataset at `output` (resumable).

    Args:
        model: saved `SDASPipeline` folder, Hub id, a benchmark name (``mvtec-ad``) or None for the
            default pipeline of the categories' benchmark (see `resolve_model`).
        categories: category names (as known by the model; ``"bottle"`` or ``"mvtec-ad/bottle"``).
        strength: fixed s, or (min, max) with s ~ U(min, max) drawn per image.
        seed: image i of every category uses seed + i (its latents, strength and step noise). So a
            run with seed 1 repeats the images of a run with seed 0 shifted by one, and image i of
            all categories shares its starting noise. To extend a set, pick a far-apart seed such
            as seed + 1_000_000 (into a new folder), not seed + 1.
        steps: respaced sampling steps, 1 .. the scheduler's num_train_timesteps (1000).
        sampler: "ddpm" (official) or "ddim".
        on_image_saved: called with each image's record after it is written (progress hooks, tests).

    Everything that can be checked cheaply (numbers, categories, steps against the model's
    scheduler) is checked before `.sia/settings.json` is written, so a typo does not lock the folder.
    """
    from accelerate import PartialState

    num_images, batch_size, steps, seed = _checked_counts(num_images, batch_size, steps, seed)
    strengths = parse_strength(strength)
    names = parse_categories(categories)
    device = parse_device(device)
    output = writable_folder_path(output, "`output`")
    state = PartialState()
    pipe, model_id, resolved_revision, names = _prepare_pipeline(model, names, output, revision, device or state.device,
                                                                 dtype, sampler, strengths, steps, state)
    settings = {"model": model_id, "revision": resolved_revision, "sampler": sampler.lower(), "steps": steps,
                "strength": list(strengths), "seed": seed, "dtype": dtype}
    _claim_folder(output / ".sia" / "settings.json", settings, state)

    slots = _ImageSlots(output, num_images)
    items = [(name, i) for name in names for i in range(num_images)]
    mine = items[state.process_index::state.num_processes]
    todo = [(n, i) for n, i in mine if not slots.done(n, i)]
    slots.make_folders(names)
    with saving_progress(len(todo), "sia generate", progress and state.is_main_process, on_image_saved) as saved:
        generated = _sample_into(pipe, slots, todo, strengths, settings, batch_size, saved)

    state.wait_for_everyone()
    metadata = _rebuild_metadata(output) if state.is_main_process else None
    state.wait_for_everyone()
    return GenerationSummary(output=output, generated=generated, skipped=len(mine) - len(todo),
                             total=len(items), metadata=metadata)


@contextmanager
def saving_progress(total: int, desc: str, enabled: bool, on_image_saved: Callable[[dict], None] | None = None):
    """A progress bar over the images a run writes; yields the callback each written image's record
    goes to (it advances the bar, then calls ``on_image_saved``)."""
    with tqdm(total=total, desc=desc, unit="img", disable=not enabled) as bar:
        def saved(record: dict) -> None:
            bar.update()
            if on_image_saved is not None:
                on_image_saved(record)

        yield saved


def _checked_counts(num_images: int, batch_size: int, steps: int, seed: int) -> tuple[int, int, int, int]:
    """The whole numbers of a run, checked; every ``seed + i`` must fit a torch generator."""
    num_images, batch_size, steps = (whole_number(v, n, minimum=1) for n, v in
                                     (("num_images", num_images), ("batch_size", batch_size), ("steps", steps)))
    seed = whole_number(seed, "seed", minimum=0)
    if seed + num_images - 1 > MAX_SEED:
        raise InputError(f"`seed` must be at most 2**64 - `num_images`, so that every seed + i fits a torch generator; "
                         f"got {seed}")
    return num_images, batch_size, steps, seed


def _prepare_pipeline(model: str | os.PathLike | None, names: list[str], output: Path, revision: str | None,
                      device: torch.device | None, dtype: str, sampler: str, strengths: Sequence[float], steps: int,
                      state) -> tuple[SDASPipeline, str, str | None, list[str]]:
    """The loaded pipeline with its sampler set, its id and revision, and the categories as it names them.

    ``steps`` and the category folders are checked against the model here, before anything is written."""
    model = resolve_model(model, names)
    if Path(model).is_dir():  # images written into the model folder would mix with its files
        separate_output(output, [model], "`output`")
    pipe, model_id, resolved_revision = load_generation_pipeline(model, revision, device, dtype)
    pipe.use_sampler(sampler)
    warning = strength_warning(strengths, sampler)
    if warning and state.is_main_process:
        logger.warning(warning)
    pipe.set_progress_bar_config(disable=True)
    max_steps = int(pipe.scheduler.config.num_train_timesteps)
    if steps > max_steps:
        raise InputError(f"`steps` must be at most {max_steps} (the model's num_train_timesteps), got {steps}")
    # De-duplicate after resolving: "bottle" and "mvtec-ad/bottle" are the same category.
    names = list(dict.fromkeys(pipe.categories[pipe.category_id(n)] for n in names))
    for name in names:  # the pipeline holds plain names; a category folder must still stay in `output`
        inside(output, name, "`categories`")
    return pipe, model_id, resolved_revision, names


def _claim_folder(settings_path: Path, settings: dict, state, keys: Sequence[str] = SETTINGS_KEYS) -> None:
    """Record this run's settings in a new folder (main process), or check them against the folder's."""
    known = _check_settings(settings_path, settings, keys)
    if state.is_main_process and not known:
        settings_path.parent.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    state.wait_for_everyone()
    _check_settings(settings_path, settings, keys)


class _ImageSlots:
    """Where image ``index`` of a category and its record go; an image is done when both exist."""

    def __init__(self, output: Path, num_images: int) -> None:
        self.output = output
        self.width = max(6, len(str(num_images - 1)))

    def paths(self, name: str, index: int) -> tuple[Path, Path]:
        stem = f"{index:0{self.width}d}"
        return self.output / name / f"{stem}.png", self.output / ".sia" / "records" / name / f"{stem}.json"

    def done(self, name: str, index: int) -> bool:
        return all(p.is_file() for p in self.paths(name, index))

    def make_folders(self, names: Sequence[str]) -> None:
        for name in names:
            (self.output / name).mkdir(parents=True, exist_ok=True)
            (self.output / ".sia" / "records" / name).mkdir(parents=True, exist_ok=True)


def _sample_into(pipe: SDASPipeline, slots: _ImageSlots, todo: Sequence[tuple[str, int]], strengths: Sequence[float],
                 settings: dict, batch_size: int, saved: Callable[[dict], None]) -> int:
    """Sample the ``todo`` images in batches, image ``i`` from its own generator seeded ``seed + i``;
    write each image and then its record (atomically). Returns how many were written."""
    seed, steps = settings["seed"], settings["steps"]
    strength_arg = strengths[0] if len(strengths) == 1 else strengths
    generated = 0
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + i) for _, i in batch]
        result = pipe(category=[n for n, _ in batch], strength=strength_arg, num_inference_steps=steps,
                      generator=generators, output_type="pil")
        for (name, index), image, s in zip(batch, result.images, result.strengths):
            image_path, record_path = slots.paths(name, index)
            _write_atomic(image_path, lambda tmp, im=image: im.save(tmp, format="PNG"))
            record = {"file_name": f"{name}/{image_path.name}", "category": name, "index": index,
                      "strength": s, "seed": seed + index, "model": settings["model"],
                      "revision": settings["revision"], "sampler": settings["sampler"], "steps": steps,
                      "dtype": settings["dtype"]}
            _write_text_atomic(record_path, json.dumps(record, sort_keys=True))
            generated += 1
            saved(record)
    return generated
