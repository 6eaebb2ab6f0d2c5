"""Plumbing under the method, the weights and the workflow: nothing here knows about HybridMIM.

- ``atomic_files``: files whole or absent (every file the project writes);
- ``distributed``: rank and world size, gathering with gradient, the process group's shutdown (DDP or none).

This subpackage imports nothing else of ``hybridmim_components``, so every layer above may use it.
"""
# both modules imported, so that a config's ``$hybridmim_components.utils.distributed.shutdown_process_group()``
# resolves after a plain ``import hybridmim_components``
from . import atomic_files, distributed
