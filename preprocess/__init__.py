"""Raw images, videos and 3D assets → WebDataset shards + parquet manifests, as Ray jobs."""
