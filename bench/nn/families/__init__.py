"""Layer families: one module each, holding its layers, its network builder, its architecture registrations
(with their default input handling) and what its guarantee rests on. Several losses (methods/) train them.
Importing this package registers every family's architectures; families never import methods/."""
from bench.nn.families import cpl, local_lip, sandwich, sll, soc  # noqa: F401
