"""Imported to warm a process (see :mod:`kmdask.engine.warm`): LocalCluster's worker
processes are forked from a server that imported this module first."""

from kmdask.engine.warm import warm

warm()
