"""`llava-edge eval`: LLaVA-1.5's benchmarks (POPE, MME, MMBench, SEED-Bench) and the shapes world, read from their
own file layouts, answered through the engine (or the reference, passed in by the command), scored as LLaVA-1.5
scores them, and set side by side. No torch."""
