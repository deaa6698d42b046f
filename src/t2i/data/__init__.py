"""t2i.data: datasets and data tools.

- `readers`: `build_dataset` over webdataset shards / image folders (split, shuffle, resume, bad-data stats).
- `precached`: shards of latent moments + text embeddings (`PrecachedShardWriter`, `build_precached_dataset`).
- `transforms`: decode, resize, crop, flip, [-1, 1] tensors; `sources`: shard patterns; `stats`: `DataStats`.
- `shapes`: the procedural captioned-shapes dataset; `judge`: its analytic scorer; `grid`: `make_grid`.
"""
