"""``seqface eval ...``: verification protocols on exported models and checkpoints.

    seqface eval pairs --model run/export --pairs lfw/pairs.txt --root lfw/images --flip
    seqface eval bin   --model w.safetensors --backbone sphere20 --bin lfw.bin --roc roc.png
    seqface eval bin   --model run/export --bin lfw.bin cfp_fp.bin agedb_30.bin   # together
    seqface eval video --model model.pt --trust-model --splits ytf/splits.txt --root ytf/frames
    seqface eval ijb   --model run/export --root IJB_release/IJBB --flip --json ijbb.json

``--model`` is an export folder (``seqface train`` writes ``<checkpoint>/export``) or a
file in it, or a ``.safetensors`` state dict whose backbone is named by ``--backbone`` (or
by ``--config``'s model section, or a ``model.json`` beside it). None of these unpickles
anything. A ``.pt2`` program or a TorchScript file can run code when loaded: only with
``--trust-model``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="verification on pairs, .bin files, videos and IJB")
    esub = p.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)

    pp = esub.add_parser("pairs", help="LFW-style pairs.txt + image root, 10-fold protocol")
    pp.add_argument("--pairs", required=True, help="pairs.txt ('10 300' header)")
    pp.add_argument("--root", required=True, help="image root: ROOT/name/name_0001.jpg")
    _common(pp)
    pp.set_defaults(handler=_run_pairs)

    pb = esub.add_parser("bin", help="insightface-style .bin verification files, one or "
                         "several (lfw, cfp_fp, agedb_30 ... evaluated together)")
    pb.add_argument("--bin", required=True, dest="bin_files", nargs="+", metavar="BIN",
                    help="the .bin files (local or s3://); each named by its file stem")
    _common(pb)
    pb.set_defaults(handler=_run_bin)

    pv = esub.add_parser("video", help="YouTube-Faces-style video pairs, 10 splits")
    pv.add_argument("--splits", required=True, help="splits.txt: split, video1, video2, ..., same")
    pv.add_argument("--root", required=True, help="frame root: ROOT/<video>/*.jpg")
    pv.add_argument("--max-frames", type=int, default=0, help="frames per video (0 = all)")
    _common(pv)
    pv.set_defaults(handler=_run_video)

    from seqface_dist.eval.ijb import IJB_FARS

    pi = esub.add_parser(
        "ijb", help="IJB-B/C-style template verification (media pooling, TAR@FAR)",
        description="1:1 template verification in insightface's IJB layout: "
        "ROOT/meta/<target>_face_tid_mid.txt (image template media), "
        "ROOT/meta/<target>_template_pair_label.txt (t1 t2 label), ROOT/loose_crop/<image>. "
        "Image features are L2-normalised, averaged per media of a template, the media "
        "averaged per template and normalised; a pair's score is their cosine. No landmark "
        "alignment is done: the crops must already be aligned to the model's input "
        "(insightface's loose crops need its 5-point alignment first).")
    pi.add_argument("--root", default=None, help="IJB folder holding meta/ and loose_crop/")
    pi.add_argument("--target", default=None,
                    help="meta file prefix: ijbb or ijbc (default: ROOT's name, lower-cased)")
    pi.add_argument("--tid-mid", default=None, help="image template_id media_id file "
                    "(default ROOT/meta/<target>_face_tid_mid.txt)")
    pi.add_argument("--pair-label", default=None, help="template1 template2 label file "
                    "(default ROOT/meta/<target>_template_pair_label.txt)")
    pi.add_argument("--images", default=None, help="folder of the aligned crops "
                    "(default ROOT/loose_crop)")
    pi.add_argument("--json", default=None, help="write the result (TAR@FAR, AUC) as JSON")
    _common(pi)
    pi.set_defaults(handler=_run_ijb, far=list(IJB_FARS))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="an export folder or file in it, .safetensors weights, or (with "
                   "--trust-model) a .pt2 program / TorchScript file")
    p.add_argument("--trust-model", action="store_true",
                   help="allow .pt2 and TorchScript files, which can run code when loaded")
    p.add_argument("--config", default=None, help="config YAML whose model section describes "
                   "the backbone of a .safetensors file")
    p.add_argument("--backbone", default=None, help="backbone name (overrides --config)")
    p.add_argument("--embedding-dim", type=int, default=None)
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="model input size (default: the model's own / the config's)")
    p.add_argument("--flip", action="store_true", help="sum features of image and mirror")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--far", type=float, nargs="+", default=[1e-3, 1e-4],
                   help="FAR targets for TAR@FAR")
    p.add_argument("--roc", default=None, help="write the ROC curve to this PNG")
    p.add_argument("--no-progress", action="store_true")


def _model(args: argparse.Namespace):  # -> (nn.Module, input_size or None)
    from seqface_dist.config import Config, load_config
    from seqface_dist.eval.embed import load_model

    cfg = load_config(args.config, []) if args.config else Config()
    m = cfg.model
    if args.backbone:
        m.backbone = args.backbone
    if args.embedding_dim is not None:
        m.embedding_dim = args.embedding_dim
    if args.in_channels is not None:
        m.in_channels = args.in_channels
    if args.input_size is not None:
        m.input_size = list(args.input_size)
    m.validate("model")
    named = bool(args.backbone or args.config)  # else model.json / the file says
    try:
        net = load_model(args.model, m if named else None, device=args.device,
                         trust_code=args.trust_model)
    except ValueError as e:
        raise SystemExit(f"seqface eval: {e}") from None
    return net, args.input_size


def _finish(args: argparse.Namespace, results: dict) -> int:
    """Each result's summary (headed by its name when there are several, then a table of
    their accuracies), and the ROC of all of them with --roc."""
    if len(results) == 1:
        print(next(iter(results.values())).summary())
    else:
        for name, res in results.items():
            print(f"== {name}\n{res.summary()}")
        width = max(len(n) for n in results)
        print("\n".join([f"{'set':<{width}}  accuracy", *(
            f"{n:<{width}}  {r.accuracy:.4f} ± {r.accuracy_std:.4f}"
            for n, r in results.items())]))
    if args.roc:
        from seqface_dist.eval.verification import plot_roc

        title = f"ROC: {next(iter(results))}" if len(results) == 1 else "ROC"
        print(f"ROC curve: {plot_roc(results, args.roc, title=title)}")
    return 0


def _eval_set(args: argparse.Namespace, path: str, root: str | None) -> int:
    from seqface_dist.eval.evaluate import evaluate_model, load_verification_set

    vset = load_verification_set(path, root)
    net, size = _model(args)
    res = evaluate_model(net, vset, flip=args.flip, batch_size=args.batch_size,
                         input_size=size, far_targets=args.far, progress=not args.no_progress,
                         device=args.device)
    return _finish(args, {vset.name: res})


def _clear_errors(fn):
    """Bad files and arguments end with one line naming them, not a traceback."""
    import functools
    import pickle
    import sys

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, KeyError, OSError, pickle.UnpicklingError) as e:
            print(f"seqface eval {args.eval_command}: error: {e}", file=sys.stderr)
            return 2

    return run


@_clear_errors
def _run_pairs(args: argparse.Namespace) -> int:
    return _eval_set(args, args.pairs, args.root)


@_clear_errors
def _run_bin(args: argparse.Namespace) -> int:
    """Every .bin with one model load; each set's summary, then a table of all of them."""
    from seqface_dist.config import EvalSetConfig, eval_set_name
    from seqface_dist.eval.evaluate import evaluate_model
    from seqface_dist.eval.sets import load_eval_set

    net, size = _model(args)
    results = {}
    for path in args.bin_files:
        vset = load_eval_set(EvalSetConfig(name=eval_set_name(path), path=path))
        results[vset.name] = evaluate_model(
            net, vset, flip=args.flip, batch_size=args.batch_size, input_size=size,
            far_targets=args.far, progress=not args.no_progress, device=args.device)
    return _finish(args, results)


@_clear_errors
def _run_video(args: argparse.Namespace) -> int:
    from seqface_dist.eval.evaluate import evaluate_video_model
    from seqface_dist.eval.video import read_video_splits

    pairs = read_video_splits(args.splits)
    net, size = _model(args)
    res = evaluate_video_model(net, pairs, args.root, max_frames=args.max_frames,
                               flip=args.flip, batch_size=args.batch_size, input_size=size,
                               far_targets=args.far, progress=not args.no_progress,
                               device=args.device)
    return _finish(args, {"video": res})


@_clear_errors
def _run_ijb(args: argparse.Namespace) -> int:
    from seqface_dist.eval.ijb import (
        evaluate_ijb_model,
        meta_paths,
        plot_ijb_roc,
        read_protocol,
        write_json,
    )

    if args.root:
        tid_mid, pair_label, images = meta_paths(args.root, args.target)
    elif not (args.tid_mid and args.pair_label and args.images):
        raise ValueError("give --root (insightface's IJB layout), or all of --tid-mid, "
                         "--pair-label and --images")
    else:
        tid_mid = pair_label = images = None
    tid_mid, pair_label = args.tid_mid or tid_mid, args.pair_label or pair_label
    images = args.images or images
    proto = read_protocol(tid_mid, pair_label)
    net, size = _model(args)
    name = (args.target or (Path(args.root).name if args.root else "ijb")).lower()
    res = evaluate_ijb_model(net, proto, images, flip=args.flip, batch_size=args.batch_size,
                             input_size=size, far_targets=args.far,
                             progress=not args.no_progress, device=args.device, name=name)
    print(res.table())
    if args.json:
        print(f"JSON: {write_json(res, args.json)}")
    if args.roc:
        print(f"ROC curve: {plot_ijb_roc(res, args.roc)}")
    return 0
