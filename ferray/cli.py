"""Thin command line: parse, build settings, call a stage's `run(settings, …)`, print a summary."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

from ferray import __version__
from ferray.config import Settings, load_settings
from ferray.errors import EXIT_CANNOT_RUN, EXIT_CONFIG, FerrayError
from ferray.logs import configure as configure_logging
from ferray.logs import redact, secrets_of

log = logging.getLogger("ferray")
__all__ = ["EXIT_CANNOT_RUN", "EXIT_CONFIG", "main"]


def _cmd_ingest(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray.data import ingest

    return ingest.run(settings, args.dataset, args.source, args.out)


def _cmd_align(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray.faces import stage as align

    return align.run(settings, args.input, args.out)


def _cmd_embed(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray.model import embed

    return embed.run(settings, args.input, args.out)


def _cmd_evaluate(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray import evaluate

    return evaluate.run(settings, args.model, args.data, args.report_out, calibrate_on=args.calibrate_on)


def _cmd_annotate(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray import annotate

    return annotate.run(settings, args.model, args.source, args.out)


def _cmd_train(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray import training

    return training.run(settings, args.input, args.model_out)


def _cmd_ensemble(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray.model import ensemble

    return ensemble.run(settings, args.input, args.model_out)


def _cmd_pipeline(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray import pipeline

    if args.retrain:
        from ferray import retrain

        return retrain.run(settings)
    return pipeline.run(settings)


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> Any:
    from ferray import demo

    return demo.run(settings, args.out, train=args.train)


def _parser() -> argparse.ArgumentParser:
    from ferray.data.datasets import READERS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE.yaml", help="settings file; FERRAY_<SECTION>__<FIELD> env vars override it")
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="ferray's own records; DEBUG also lets TensorFlow, absl, CUDA and Ray say everything")
    common.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                        help="the same as --log-level DEBUG")

    parser = argparse.ArgumentParser(prog="ferray", description="Facial-expression recognition as a batch job on Ray.")
    parser.add_argument("--version", action=_Version, help="ferray's version and the default model's; then exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", parents=[common], help="a dataset layout -> Parquet shards")
    ingest.add_argument("dataset", choices=sorted(READERS), metavar="DATASET", help=f"one of: {', '.join(sorted(READERS))}")
    ingest.add_argument("source", metavar="SOURCE", help="folder, zip/tar, CSV file, or s3:// prefix")
    ingest.add_argument("out", metavar="OUT", help="output folder or s3:// prefix")
    ingest.add_argument("--shard-rows", type=int, help="rows per output shard")
    ingest.set_defaults(handler=_cmd_ingest, overrides=lambda a: {"ingest": {"shard_rows": a.shard_rows}})

    align = commands.add_parser("align", parents=[common], help="Dlib detection + alignment of every image row")
    align.add_argument("input", metavar="IN", help="ingested shards (folder or s3:// prefix)")
    align.add_argument("out", metavar="OUT", help="output folder or s3:// prefix")
    align.add_argument("--upsample", type=int, help="HOG upsample count (faces.upsample)")
    align.add_argument("--size", type=int, help="aligned face size in pixels (faces.size)")
    align.set_defaults(handler=_cmd_align, overrides=lambda a: {"faces": {"upsample": a.upsample, "size": a.size}})

    embed = commands.add_parser("embed", parents=[common], help="frozen-backbone embeddings of aligned faces")
    embed.add_argument("input", metavar="IN", help="aligned shards (folder or s3:// prefix)")
    embed.add_argument("out", metavar="OUT", help="output folder or s3:// prefix")
    embed.add_argument("--backbone", help="efficientnet-lite0 | efficientnet-b0 … b7 (backbone.name)")
    embed.add_argument("--input-size", type=int, help="side the backbone sees (backbone.input_size)")
    embed.add_argument("--gpus", type=float, help="GPUs per embedding actor (backbone.num_gpus)")
    embed.set_defaults(handler=_cmd_embed, overrides=lambda a: {
        "backbone": {"name": a.backbone, "input_size": a.input_size, "num_gpus": a.gpus}})

    evaluate = commands.add_parser("evaluate", parents=[common], help="metrics, confusion matrix, t-SNE, "
                                   "misclassified grid, reliability and report.md of a model on labelled shards")
    evaluate.add_argument("model", metavar="MODEL", help="model folder, s3:// URI, registry URI, or `default`")
    evaluate.add_argument("data", metavar="DATA", help="aligned or embedded shards of any dataset")
    evaluate.add_argument("report_out", metavar="REPORT_OUT", help="report folder or s3:// prefix")
    evaluate.add_argument("--split", choices=["train", "val", "test", "all"],
                          help="rows to score (default: test where DATA has one, else every labelled row)")
    evaluate.add_argument("--calibrate-on", metavar="VAL_DATA", help="first fit a temperature on VAL_DATA's val "
                          "split and store it in MODEL's ferray.json (inference.temperature)")
    evaluate.set_defaults(handler=_cmd_evaluate, overrides=lambda a: {"evaluate": {"split": a.split}})

    annotate = commands.add_parser("annotate", parents=[common], help="label every face in the images and "
                                   "sampled video frames under SOURCE (incremental: reruns do only new files)")
    annotate.add_argument("model", metavar="MODEL", help="model folder, s3:// URI, registry URI, or `default`")
    annotate.add_argument("source", metavar="SOURCE", help="folder, zip/tar, or s3:// prefix of images and videos")
    annotate.add_argument("out", metavar="OUT", help="output folder or s3:// prefix")
    annotate.add_argument("--fps", type=float, help="video frames sampled per second (annotate.fps, default 2)")
    annotate.add_argument("--every-nth", type=int, help="sample every Nth video frame instead (annotate.every_nth)")
    annotate.add_argument("--segment-seconds", type=float, help="video segment length shared out to workers")
    annotate.add_argument("--gpus", type=float, help="GPUs per classifying actor (annotate.num_gpus)")
    annotate.add_argument("--smooth-seconds", type=float, help="window of each face track's smoothed label "
                          "(annotate.smooth_seconds, default 2; 0 = off)")
    annotate.add_argument("--overlays", action="store_true", default=None, help="also draw the pictures: "
                          "boxes and labels on each image, a sheet per video, the faces (OUT/_overlays/)")
    annotate.set_defaults(handler=_cmd_annotate, overrides=lambda a: {"annotate": {
        "fps": a.fps, "every_nth": a.every_nth, "segment_seconds": a.segment_seconds, "num_gpus": a.gpus,
        "smooth_seconds": a.smooth_seconds, "overlays": a.overlays}})

    train = commands.add_parser("train", parents=[common], help="fit the head on embeddings with Ray Train; write the model")
    train.add_argument("input", metavar="IN", help="embedded shards (folder or s3:// prefix)")
    train.add_argument("model_out", metavar="MODEL_OUT", help="model folder or s3:// prefix (model.keras + ferray.json)")
    train.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    train.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (train.use_gpu)")
    train.add_argument("--epochs", type=int, help="epochs (train.epochs; paper recipe: SGD 0.9, lr 1e-3 x0.9 / 10 epochs)")
    train.add_argument("--batch-size", type=int, help="global batch size (train.batch_size)")
    train.add_argument("--fine-tune", metavar="K|all", help="adapt the backbone instead: unfreeze its top K blocks "
                       "(or all) and train end to end on ALIGNED faces (finetune.unfreeze; recipe in finetune.*)")
    train.set_defaults(handler=_cmd_train, overrides=_train_overrides)

    ensemble = commands.add_parser("ensemble", parents=[common], help="average several models into one; "
                                   "TTA and temperature chosen on ALIGNED's val split")
    ensemble.add_argument("input", metavar="ALIGNED", help="aligned shards with val (and test) rows")
    ensemble.add_argument("model_out", metavar="MODEL_OUT", help="model folder or s3:// prefix")
    ensemble.add_argument("--members", nargs="+", metavar="MODEL", help="the models to average (ensemble.members)")
    ensemble.set_defaults(handler=_cmd_ensemble, overrides=lambda a: {"ensemble": {"members": a.members}})

    pipeline = commands.add_parser("pipeline", parents=[common], help="ingest -> align -> embed -> train -> evaluate from --config")
    pipeline.add_argument("--workdir", help="where every stage's output is cached (pipeline.workdir)")
    pipeline.add_argument("--retrain", action="store_true", help="rerun on the current data, publish the model to "
                          "the registry and promote it only if it scores at least current - tolerance on the "
                          "fixed holdout (retrain.*)")
    pipeline.add_argument("--registry", help="registry folder or s3:// prefix for --retrain (retrain.registry)")
    pipeline.set_defaults(handler=_cmd_pipeline, overrides=lambda a: {"pipeline": {"workdir": a.workdir},
                                                                      "retrain": {"registry": a.registry}})

    demo = commands.add_parser("demo", parents=[common], help="run ferray on the bundled sample, locally")
    demo.add_argument("--out", default="ferray-demo", help="output folder (default: ./ferray-demo)")
    demo.add_argument("--train", action="store_true", help="also run the training loop on 35 bundled faces "
                      "(ingest -> align -> embed -> train -> evaluate; a few minutes)")
    demo.set_defaults(handler=_cmd_demo, overrides=lambda a: {})
    return parser


class _Version(argparse.Action):
    """`--version`: read the default model's ferray.json only when asked, not at every parse."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from ferray.model.artifact import default_version

        print(f"ferray {__version__} (default model {default_version()})")  # on stdout, as argparse's own
        parser.exit()


def _train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    # With --fine-tune, --epochs and --batch-size speak of the fine-tune's recipe.
    recipe = {"epochs": a.epochs, "batch_size": a.batch_size}
    placement = {"workers": a.workers, "use_gpu": a.gpu}
    if a.fine_tune is not None:
        return {"train": placement, "finetune": {"unfreeze": a.fine_tune, **recipe}}
    return {"train": {**placement, **recipe}}


def _overrides(raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Command-line flags as init values; unset flags are left to env, YAML and defaults."""
    return {section: values for section, fields in raw.items() if (values := {k: v for k, v in fields.items() if v is not None})}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)  # before anything imports TensorFlow or starts Ray
    handler: Callable[[Settings, argparse.Namespace], Any] = args.handler
    # Only ferray's own errors become a one-line exit; anything else is a bug and raises with its traceback.
    try:
        settings = load_settings(args.config, **_overrides(args.overrides(args)))
        redact(secrets_of(settings.storage))  # before any library can log a request with them
        log.debug("ferray %s %s, settings: %s", __version__, args.command, settings.public_dict())
        summary = handler(settings, args)
    except FerrayError as error:
        print(f"ferray: {_reason(error)}", file=sys.stderr)
        return error.exit_code
    print(summary.render())
    return 0


def _reason(error: FerrayError) -> str:
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"config error: {line}" if error.exit_code == EXIT_CONFIG else f"cannot run: {line}"


if __name__ == "__main__":
    sys.exit(main())
