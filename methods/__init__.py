"""Method plugins, one file each. Importing this package registers them all."""
from methods import cll, gloro, standard  # noqa: F401
from methods import cpl, lbdn, local_lip, sll, soc  # noqa: F401
