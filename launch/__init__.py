"""Launchers: run on the user's machine or a login node, build commands as data, then run them.

Installed as the `dtrain_launch` package (see pyproject.toml). May import dtrain; dtrain never imports this.
"""
