"""Nimble's Python worker: runs one data-parallel replica of the researcher's model.

The provider (TypeScript) drives it over fd 3; see docs/protocol.md, "Worker link".
"""
