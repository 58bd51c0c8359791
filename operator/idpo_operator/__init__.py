"""idpo operator side: spec models, the pure plan, status, the local runner and the CLI."""
