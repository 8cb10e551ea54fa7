"""The data plane: WebDataset shard sets of identities and sequences, built and streamed.

Building (``seqface shards build|verify|info``, see ``cli.py``)::

    from seqface_dist.data.build import (BuildOptions, build_identity_tree,
                                         build_sequence_tree, build_recordio, write_shard_set)
    build_identity_tree("faces/", "s3://bucket/ids", BuildOptions(image_size=(112, 96)))
    write_shard_set(((label, uint8_array) for ...), "out/ids", "identity", num_classes=10)

Reading (the trainer's input; API at the top of ``loader.py``)::

    from seqface_dist.data.loader import make_train_loader
    from seqface_dist.data.normalize import normalize
    loader = make_train_loader(cfg.data, rank=r, world_size=R, image_size=(112, 96),
                               channels=3, seed=cfg.train.seed)
    for images, center_index in loader:      # uint8 B x H x W x C, int64 center indices
        x = normalize(images.to(device))     # float B x C x H x W, (x - 127.5) / 128
    loader.layout.to_dict()                  # N_id, N_seq, per-set offsets (for checkpoints)
    loader.counters()                        # samples/shards/bytes read, bad samples by reason

Modules: ``store`` (paths, file://, s3://), ``s3`` (boto3, ranged resumable reads,
multipart uploads, the webdataset ``s3:`` opener), ``tario`` (deterministic tar writer,
tolerant tar reader), ``images`` (JPEG decode/encode), ``recordio`` (MXNet .rec/.idx),
``sources`` (listing input layouts), ``manifest``, ``build``, ``stream`` (per-kind sample
streams), ``layout`` (shard sets' classes among the head's rows), ``plan`` (batch counts and
quotas, equal across ranks), ``augment`` (crop, mirror), ``loader`` (mixing and batching in
worker processes), ``samples`` (every sample once, for evaluation and checks), ``batchring``
(shared-memory batch slots), ``batchworkers`` (the processes that fill them), ``counters``,
``verify``, ``testing`` (moto S3 on loopback and a connection-cutting proxy).
"""
