"""Hydra SearchPathPlugin of tokred (see ``tokred_searchpath.py``)."""
