"""Deploy and profile over SSH (paramiko): inventory, connection, transfer, releases, fleet.

The only package that imports paramiko.
"""
