"""`goca-eval {knn,codes,linear,finetune,export,plots}`: the evaluation suite's command line.

Every subcommand takes a checkpoint file or a pretraining run directory (its latest intact checkpoint is used);
the protocol defaults come from the checkpoint's own config. Results, plots and the feature cache go to
<run_dir>/eval unless --out says otherwise. Input problems end with one line `goca-eval: error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import Optional, Sequence

from goca_fast.cli.help import HelpFormatter
from goca_fast.config import ConfigError
from goca_fast.data.index import DatasetIndexError
from goca_fast.data.views import ViewOverrides
from goca_fast.eval.codes import CodesOptions, run_codes
from goca_fast.eval.export import ExportOptions, run_export, run_export_weights
from goca_fast.eval.finetune import run_finetune
from goca_fast.eval.finetune_recipe import FinetuneSettings
from goca_fast.eval.knn import KnnOptions, run_knn
from goca_fast.eval.linear import LinearOptions, ProbeSettings, run_linear
from goca_fast.eval.plots import PlotOptions, run_plots
from goca_fast.plan.evaluation import CheckpointRequest, EvalOverrides, eval_setup, finetune_start, load_eval_model
from goca_fast.runtime.device import resolve_device
from goca_fast.runtime.stop_signals import RunStopped
from goca_fast.train.checkpoint import CheckpointError

PROG = "goca-eval"


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return vals


def _streams(text: str) -> list[str]:
    vals = [x.strip() for x in text.replace("+", ",").split(",") if x.strip()]
    bad = [v for v in vals if v not in ("rgb", "flow")]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"streams must be rgb, flow or rgb,flow, got {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _common(p: argparse.ArgumentParser, protocol: bool = True, views: bool = True, splits: bool = True,
            streams: bool = True, arch: bool = True, out: str = "<run_dir>/eval") -> None:
    """The options subcommands share; each subcommand takes only those it uses."""
    p.add_argument("source", help="checkpoint file or pretraining run directory (its latest intact checkpoint)")
    p.add_argument("--data-root", help="prepared dataset to evaluate on (default: the pretraining dataset)")
    if splits:
        p.add_argument("--train-split", help="gallery / training split (default: the config's data.train_split)")
        p.add_argument("--test-split", help="query / test split (default: the config's data.test_split)")
    if streams:
        p.add_argument("--streams", type=_streams, help="rgb, flow or rgb,flow (default: every stream of the model)")
    p.add_argument("--workers", type=int, help="loader processes (default: the config's data.workers)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda[:N]")
    p.add_argument("--out", help=f"output directory (default: {out})")
    p.add_argument("--config", help="pretraining YAML, for checkpoints that carry no config")
    if arch:
        p.add_argument("--arch", help="fail unless the checkpoint is of this architecture (e.g. r2plus1d_18)")
    if protocol and views:
        p.add_argument("--clips", type=_positive, help="uniform clips per video (default: eval.clips, official 5)")
        p.add_argument("--crops", type=int, choices=(1, 3), help="spatial crops per clip (default: eval.crops, 3)")
    if protocol:
        p.add_argument("--clip-length", type=_positive, help="frames per clip (default: longest pretraining clip)")
        p.add_argument("--stride", type=_positive, help="frame stride (default: data.stride)")
        p.add_argument("--batch-size", type=_positive, help="videos per batch (default: eval.batch_size)")
        p.add_argument("--amp", default="off", choices=("auto", "bf16", "fp16", "off"),
                       help="autocast for feature extraction (default off: exact fp32 features)")
        p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                                description="Evaluate GOCA checkpoints: kNN retrieval, linear probe, "
                                "fine-tuning, feature export, plots, code diagnostics. Each subcommand takes a checkpoint or a run "
                                "directory; see `goca-eval <subcommand> --help`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{knn,codes,linear,finetune,export,plots}")

    k = sub.add_parser("knn", formatter_class=HelpFormatter, help="nearest-neighbour video retrieval R@1/5/10/20/50")
    _common(k)
    k.add_argument("--feature", default="backbone", choices=("backbone", "head"),
                   help="pooled backbone features (default, official) or projection-head embeddings")
    k.add_argument("--ks", type=_ints, default=[1, 5, 10, 20, 50], help="comma-separated k (default 1,5,10,20,50)")
    k.add_argument("--plots", action="store_true", help="also draw the retrieval grid and PCA map")
    k.add_argument("--fusion", default=None, choices=("concat", "weighted"),
                   help="add a 'fused' RGB+flow row beside the official average: concatenated normalised features "
                        "(concat), or weighted by the best leave-one-out R@1 on the train split (weighted)")

    co = sub.add_parser("codes", formatter_class=HelpFormatter,
                        help="prototype codes of held-out clips: RGB-flow agreement, class NMI (guidance diagnostic)")
    _common(co, streams=False)
    lin = sub.add_parser("linear", formatter_class=HelpFormatter, help="linear probe on the frozen backbone")
    _common(lin, views=False)
    lin.add_argument("--augment", action="store_true",
                     help="train on random augmented clips each epoch (slow) instead of cached view features")
    lin.add_argument("--epochs", type=_positive, default=100, help="training epochs (official 100)")
    lin.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (official argument default 0.3)")
    lin.add_argument("--wd", type=float, default=0.0, help="weight decay (official argument default 1e-6)")
    lin.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    lin.add_argument("--milestones", type=_ints, default=[60, 80],
                     help="comma-separated epochs where the LR is multiplied by --gamma (default 60,80)")
    lin.add_argument("--gamma", type=float, default=0.1, help="LR factor at each milestone")
    lin.add_argument("--probe-batch-size", type=_positive, default=256, help="samples (views) per SGD step")
    lin.add_argument("--l2norm", action="store_true", help="L2-normalise features before the BN (official option)")
    lin.add_argument("--no-bn", action="store_true", help="drop the BatchNorm1d in front of the linear layer")
    lin.add_argument("--dropout", type=float, default=0.0, help="dropout probability before the linear layer")
    lin.add_argument("--train-clips", type=_positive, default=5, help="train views: clips per video (fast path)")
    lin.add_argument("--train-crops", type=int, choices=(1, 3), default=3, help="train views: crops per clip")
    lin.add_argument("--test-clips", type=_positive, default=10, help="test views: clips per video")
    lin.add_argument("--test-crops", type=int, choices=(1, 3), default=3, help="test views: crops per clip")
    lin.add_argument("--seed", type=int, default=0, help="seed of the classifier init and the sample order")

    ft = sub.add_parser("finetune", formatter_class=HelpFormatter,
                        help="end-to-end fine-tuning, two-stream late fusion")
    _common(ft, protocol=False, out="<run_dir>/eval/finetune; a fine-tuning run there is resumed")
    ft.add_argument("--epochs", type=_positive, default=100, help="training epochs")
    ft.add_argument("--lr", type=float, default=0.1, help="classifier LR (the backbone gets lr × ratio)")
    ft.add_argument("--backbone-lr-ratio", type=float, default=0.1, help="backbone LR / classifier LR")
    ft.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    ft.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    ft.add_argument("--batch-size", type=_positive, default=16, help="videos per process and step")
    ft.add_argument("--warmup-epochs", type=float, default=5.0, help="linear LR warm-up length (may be fractional)")
    ft.add_argument("--schedule", choices=("step", "cosine"), default="step",
                    help="after the warm-up: x gamma at the milestones, or a cosine to 0")
    ft.add_argument("--milestones", type=_ints, default=[60, 80],
                    help="comma-separated epochs of the step schedule (default 60,80)")
    ft.add_argument("--gamma", type=float, default=0.1, help="LR factor at each milestone")
    ft.add_argument("--dropout", type=float, default=0.5, help="dropout probability before the classifier")
    ft.add_argument("--test-clips", type=_positive, default=10, help="test views: clips per video")
    ft.add_argument("--test-crops", type=int, choices=(1, 3), default=3, help="test views: crops per clip")
    ft.add_argument("--eval-every", type=int, default=0, help="epochs between 1-clip validations (default 0 = off)")
    ft.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                    help="autocast (auto = bf16 on a GPU, off on the CPU)")
    ft.add_argument("--seed", type=int, default=0, help="seed of the classifier init, data order and augmentation")
    ft.add_argument("--max-iters-per-epoch", type=int, default=0,
                    help="cut epochs short (smoke tests; default 0 = full epochs)")
    ft.add_argument("--fresh", action="store_true",
                    help="start over even if the output directory holds a fine-tuning checkpoint (by default "
                         "the same command resumes it)")

    ex = sub.add_parser("export", formatter_class=HelpFormatter, help="write features of any split to .npy or .pt")
    _common(ex, splits=False, arch=False, out="<run_dir>/eval/export")
    ex.add_argument("--split", action="append", default=[], help="split to export (repeatable; default train+test)")
    ex.add_argument("--format", default="npy", choices=("npy", "pt"),
                    help="one .npy per split and stream + <split>_meta.json, or one <split>.pt dict")
    ex.add_argument("--views", action="store_true", help="also write the per-view features (fp16)")
    ex.add_argument("--feature", default="backbone", choices=("backbone", "head"),
                    help="pooled backbone features or projection-head embeddings")
    ex.add_argument("--weights", metavar="OUT.pth",
                    help="instead of features, write one stream's backbone as a torchvision state_dict")
    ex.add_argument("--stream", default="rgb", choices=("rgb", "flow"), help="the stream --weights exports")

    pl = sub.add_parser("plots", formatter_class=HelpFormatter,
                        help="retrieval grid, PCA/t-SNE map, training curves (PNG + TensorBoard)")
    _common(pl, protocol=False, splits=False, streams=False, arch=False, out="<run_dir>/eval/plots")
    pl.add_argument("--what", default="retrieval,embedding,curves",
                    help="comma-separated subset of retrieval, embedding, curves (default: all three)")
    pl.add_argument("--stream", choices=("rgb", "flow", "both"), help="features to plot (default: both if two)")
    pl.add_argument("--method", default="pca", choices=("pca", "tsne"), help="2-D map (t-SNE needs scikit-learn)")
    pl.add_argument("--queries", type=_positive, default=8, help="rows of the retrieval grid")
    pl.add_argument("--batch-size", type=_positive, help="videos per batch (default: eval.batch_size)")
    pl.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    pl.add_argument("--no-tensorboard", action="store_true", help="do not add the images to TensorBoard")
    return p


def _request(a: argparse.Namespace, need_heads: bool = False) -> CheckpointRequest:
    """The checkpoint the command names and what of it is evaluated."""
    return CheckpointRequest(a.source, streams=getattr(a, "streams", None), need_heads=need_heads,
                             expect_arch=getattr(a, "arch", None), config_path=a.config)


def _eval_overrides(a: argparse.Namespace) -> EvalOverrides:
    """The command line's changes to the pretraining config's evaluation defaults."""
    return EvalOverrides(data_root=a.data_root, train_split=getattr(a, "train_split", None),
                         test_split=getattr(a, "test_split", None), batch_size=getattr(a, "batch_size", None),
                         workers=a.workers)


def _setup(a: argparse.Namespace, need_heads: bool = False):
    """The evaluation setup of the checkpoint the command names, with its overrides (`goca_fast.plan`)."""
    return eval_setup(_request(a, need_heads), _eval_overrides(a), device=a.device)


def _overrides(a: argparse.Namespace) -> ViewOverrides:
    """--clips/--crops/--clip-length/--stride (None: the checkpoint config's protocol)."""
    return ViewOverrides(clips=a.clips, crops=a.crops, clip_length=a.clip_length, stride=a.stride)


def dispatch(a: argparse.Namespace) -> None:
    """Map parsed arguments onto the runners' option objects (namespaces stop here)."""
    if a.command == "knn":
        options = KnnOptions(overrides=_overrides(a), feature=a.feature, ks=a.ks, amp=a.amp, plots=a.plots,
                             fusion=a.fusion)
        run_knn(_setup(a, need_heads=a.feature == "head"), options, out_dir=a.out, use_cache=not a.no_cache)
    elif a.command == "codes":
        run_codes(_setup(a, need_heads=True), CodesOptions(overrides=_overrides(a), amp=a.amp), out_dir=a.out,
                  use_cache=not a.no_cache)
    elif a.command == "linear":
        settings = ProbeSettings(epochs=a.epochs, lr=a.lr, momentum=a.momentum, weight_decay=a.wd,
                                 milestones=tuple(a.milestones), gamma=a.gamma, batch_size=a.probe_batch_size,
                                 l2norm=a.l2norm, use_bn=not a.no_bn, dropout=a.dropout, seed=a.seed)
        options = LinearOptions(settings=settings, augment=a.augment, train_clips=a.train_clips,
                                train_crops=a.train_crops, test_clips=a.test_clips, test_crops=a.test_crops,
                                clip_length=a.clip_length, stride=a.stride, amp=a.amp)
        run_linear(_setup(a), options, out_dir=a.out, use_cache=not a.no_cache)
    elif a.command == "finetune":
        settings = FinetuneSettings(epochs=a.epochs, lr=a.lr, backbone_lr_ratio=a.backbone_lr_ratio,
                                    momentum=a.momentum, weight_decay=a.wd, batch_size=a.batch_size,
                                    warmup_epochs=a.warmup_epochs, schedule=a.schedule,
                                    milestones=tuple(a.milestones), gamma=a.gamma, dropout=a.dropout,
                                    test_clips=a.test_clips, test_crops=a.test_crops, eval_every=a.eval_every,
                                    amp=a.amp, seed=a.seed, max_iters_per_epoch=a.max_iters_per_epoch)
        overrides = replace(_eval_overrides(a), batch_size=None)  # its --batch-size is the training batch
        start = finetune_start(_request(a), overrides, out_dir=a.out, fresh=a.fresh, device=a.device)
        run_finetune(start, settings)
    elif a.command == "export" and a.weights:
        loaded, cfg = load_eval_model(a.source, device=resolve_device(a.device, "--device"), config_path=a.config)
        run_export_weights(loaded, cfg.model.arch, out_path=a.weights, stream=a.stream)
    elif a.command == "export":
        options = ExportOptions(splits=a.split, fmt=a.format, keep_views=a.views, feature=a.feature,
                                overrides=_overrides(a), amp=a.amp)
        run_export(_setup(a, need_heads=a.feature == "head"), options, out_dir=a.out, use_cache=not a.no_cache)
    elif a.command == "plots":
        what = [w.strip() for w in a.what.split(",") if w.strip()]
        options = PlotOptions(what=what, stream=a.stream, method=a.method, num_queries=a.queries,
                              tensorboard=not a.no_tensorboard)
        run_plots(_setup(a), options, out_dir=a.out, use_cache=not a.no_cache)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        dispatch(args)
    except RunStopped as e:  # fine-tuning stopped by a signal or Ctrl-C, its checkpoint written
        print(e, flush=True)
        return e.exit_code
    except (ConfigError, DatasetIndexError, CheckpointError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
