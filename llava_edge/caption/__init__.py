"""`llava-edge caption`: a folder of images to JSONL with one engine, batched and resumable. No torch."""
