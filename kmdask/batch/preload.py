"""Imported to warm a process (see :func:`kmdask.batch.fitkinds.warm`): LocalCluster's worker
processes are forked from a server that imported this module first
(:mod:`kmdask.batch.cluster`)."""

from kmdask.batch.fitkinds import warm

warm()
