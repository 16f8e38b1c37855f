"""The on-disk dataset: shard files, their manifests and completion markers, and reading them back.

Modules, lowest first: `samples` (the units written and read), `codec` (image and JSON bytes, shared
with the bundle and the report), `manifest` (paths, manifest tables, markers, cleanup), one module per
output format (`webdataset`), `formats` (the writer and reader interfaces and the registry that
`output.format` selects from) and `reader` (samples, batches and manifests of complete shards).
Nothing here knows how samples are generated.
"""
