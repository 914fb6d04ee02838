"""What every stage shares, below them all: the run's configuration and parameters, errors, paths, the model
catalog, the run plan and the memory plan, run records and events, data sources, tracking, registry lookups,
and the small mechanisms used in several places (atomic durable writes, file locks, process identity and
stopping). Nothing here imports the stages (tasks/), the flows or the surface (tessera.sdk, cli, demo)."""
