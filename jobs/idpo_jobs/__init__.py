"""idpo stages: generate, rank, train (`python -m idpo_jobs.<stage> --config FILE`)."""
