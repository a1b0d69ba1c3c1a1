"""``python -m ewc ...`` (and ``torchrun ... -m ewc ...``): the ``ewc`` command line."""

from ewc.cli import main

raise SystemExit(main())
