"""``seqface shards ...``: build, verify and describe WebDataset shard sets.

    seqface shards build identity-tree ROOT OUT [--image-size HxW] [--workers 8]
    seqface shards build sequence-tree ROOT OUT
    seqface shards build recordio TRAIN.rec OUT [--idx I.idx] [--lst I.lst] [--kind identity]
    seqface shards tracks FRAMES DETECTIONS.csv OUT [--size 112x112] [--iou 0.5] [--min-len 5]
    seqface shards align ROOT FACES.csv OUT [--size 112x112]
    seqface shards verify URL       # counts, sizes and sha256 against the manifest; exit 1 if not
    seqface shards info URL         # summary of a shard set

OUT and URL: a folder, ``file://...`` or ``s3://bucket/prefix`` (``--endpoint-url`` or
``AWS_ENDPOINT_URL`` for S3-compatible stores). URL may also be a manifest or brace pattern.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="build, verify and describe shard sets")
    ssub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)

    b = ssub.add_parser("build", help="build a shard set from image folders or RecordIO")
    b.add_argument("layout", choices=["identity-tree", "sequence-tree", "recordio"])
    b.add_argument("source", help="ROOT folder, or the .rec file")
    b.add_argument("out", help="output folder or s3://bucket/prefix")
    b.add_argument("--image-size", default=None,
                   help="HEIGHTxWIDTH to resize to (default: the first image's size, so "
                   "arcface's 112x112 crops stay 112x112)")
    b.add_argument("--channels", type=int, default=3, choices=[1, 3])
    b.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    b.add_argument("--max-samples", type=int, default=10_000, help="samples per shard")
    b.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard")
    b.add_argument("--workers", type=int, default=1, help="shard-writing processes")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--kind", choices=["identity", "sequence"], default="identity",
                   help="for recordio: what its labels are")
    b.add_argument("--idx", default=None, help="for recordio: the .idx (default: beside the .rec)")
    b.add_argument("--lst", default=None, help="for recordio: an im2rec .lst naming the sources")
    b.add_argument("--endpoint-url", default="")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(handler=_build)

    t = ssub.add_parser("tracks", help="face tracks from video frames and a detector's "
                        "boxes: linked by IoU (or a given track column), cropped or aligned "
                        "by 5 landmarks, written as a sequence tree",
                        description="Writes OUT/<video>/<track>/<frame>.jpg for "
                        "`seqface shards build sequence-tree OUT ...`. FRAMES/<video>/ holds "
                        "a video's frames (ffmpeg -i v.mp4 FRAMES/v/%%06d.jpg); the CSV has "
                        "video,frame,x1,y1,x2,y2[,score][,track][,lx0,ly0,...,lx4,ly4].")
    t.add_argument("frames", help="FRAMES folder: one sub-folder of frames per video")
    t.add_argument("detections", help="CSV of face boxes (see the description)")
    t.add_argument("out", help="output folder (a sequence tree)")
    t.add_argument("--iou", type=float, default=0.5, help="IoU that continues a track")
    t.add_argument("--max-gap", type=int, default=2, help="frames a track may miss")
    t.add_argument("--min-len", type=int, default=5, help="shorter tracks are dropped")
    _crop_options(t)

    a = ssub.add_parser("align", help="aligned face crops from photos and a detector's "
                        "landmarks (or boxes), keeping the folder layout",
                        description="Writes OUT/<image path>.jpg per CSV row "
                        "image,[x1,y1,x2,y2,][score,][lx0,ly0,...,lx4,ly4]: with the five "
                        "landmarks the face is aligned onto arcface's template (SphereFace's "
                        "for --size 112x96), with a box alone cropped with --margin. An "
                        "identity tree in gives an identity tree out, for `shards build "
                        "identity-tree`.")
    a.add_argument("root", help="folder the CSV's image paths are relative to")
    a.add_argument("faces", help="CSV of faces (see the description)")
    a.add_argument("out", help="output folder")
    _crop_options(a)

    v = ssub.add_parser("verify", help="check a shard set against its manifest")
    v.add_argument("url")
    v.add_argument("--endpoint-url", default="")
    v.set_defaults(handler=_verify)

    i = ssub.add_parser("info", help="summarise a shard set")
    i.add_argument("url")
    i.add_argument("--endpoint-url", default="")
    i.set_defaults(handler=_info)


def _crop_options(p: argparse.ArgumentParser) -> None:
    """The crop options ``shards tracks`` and ``shards align`` share."""
    p.add_argument("--size", default="112x112",
                   help="HEIGHTxWIDTH of the crops (default 112x112, arcface's; 112x96 is "
                   "SphereFace's)")
    p.add_argument("--min-score", type=float, default=0.0, help="ignore weaker detections")
    p.add_argument("--margin", type=float, default=0.2,
                   help="box share added on each side when cropping without landmarks")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_faces)


def _size(text: str, flag: str = "--image-size") -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected HEIGHTxWIDTH, e.g. 112x112") from None
    if h < 8 or w < 8:
        raise SystemExit(f"{flag} {text!r}: each side must be >= 8")
    return h, w


def _build(args: argparse.Namespace) -> int:
    from seqface_dist.data import build

    opts = build.BuildOptions(
        image_size=_size(args.image_size) if args.image_size else None,
        channels=args.channels, quality=args.quality,
        max_samples=args.max_samples, max_bytes=int(args.max_bytes), workers=args.workers,
        seed=args.seed, endpoint_url=args.endpoint_url, progress=not args.no_progress)
    try:
        if args.layout == "recordio":
            report = build.build_recordio(args.source, args.out, opts, kind=args.kind,
                                          idx_path=args.idx, lst_path=args.lst)
        elif args.layout == "identity-tree":
            report = build.build_identity_tree(args.source, args.out, opts)
        else:
            report = build.build_sequence_tree(args.source, args.out, opts)
    except (build.BuildError, FileNotFoundError, ValueError) as e:
        print(f"seqface shards build: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _faces(args: argparse.Namespace) -> int:
    """``shards tracks`` (video frames) and ``shards align`` (photos): crops of faces."""
    from seqface_dist.data.tracks import TrackOptions, align_faces, extract_tracks

    tracks = args.shards_command == "tracks"
    linking = dict(iou=args.iou, max_gap=args.max_gap, min_len=args.min_len) if tracks else {}
    opts = TrackOptions(min_score=args.min_score, margin=args.margin,
                        size=_size(args.size, "--size"), **linking)
    try:
        if tracks:
            report = extract_tracks(args.frames, args.detections, args.out, opts,
                                    progress=not args.no_progress)
        else:
            report = align_faces(args.root, args.faces, args.out, opts,
                                 progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"seqface shards {args.shards_command}: {e}", file=sys.stderr)
        return 1
    for problem in report.problems[:20]:
        print(f"skipped: {problem}")
    if len(report.problems) > 20:
        print(f"... and {len(report.problems) - 20} more")
    print(report.summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from seqface_dist.data.manifest import ManifestError
    from seqface_dist.data.verify import verify_shard_set

    try:
        res = verify_shard_set(args.url, args.endpoint_url, progress=True)
    except ManifestError as e:
        print(f"seqface shards verify: {e}", file=sys.stderr)
        return 1
    for err in res.errors:
        print(f"FAIL {err}")
    status = "OK" if res.ok else f"{len(res.errors)} problems"
    print(f"{res.shard_set.url}: {res.checked} shards, {res.samples} samples: {status}")
    return 0 if res.ok else 1


def _info(args: argparse.Namespace) -> int:
    from seqface_dist.data.manifest import ManifestError, resolve_shard_set

    try:
        ss = resolve_shard_set(args.url, args.endpoint_url)
    except ManifestError as e:
        print(f"seqface shards info: {e}", file=sys.stderr)
        return 1
    m = ss.manifest
    counts = [c for _, c in ss.shards] or [0]
    print(f"manifest:    {ss.url}")
    n_name = "N_id" if m.kind == "identity" else "N_seq"
    print(f"kind:        {m.kind} ({n_name} = {m.num_classes})")
    print(f"samples:     {ss.num_samples} in {len(ss.shards)} shards "
          f"(min {min(counts)}, max {max(counts)} per shard)")
    print(f"images:      {m.image_size[0]}x{m.image_size[1]}, {m.channels} channels")
    print(f"bytes:       {sum(s.bytes for s in m.shards)}")
    print(f"source:      {m.source}")
    skipped = sum(len(s.skipped) for s in m.shards)
    if skipped:
        print(f"skipped at build: {skipped} images (see build_report.json)")
    return 0
