r"""Trajectory datasets: one xarray schema, zarr stores (save, crash-safe append, lazy open), validation.

Schema (version 1)
------------------
An ``xarray.Dataset`` with dimensions ``episode``, ``time`` and the feature dimensions ``state_dim``,
``input_dim``, ``output_dim``:

=================  ===================================  ====================================================
variable           dims                                 meaning
=================  ===================================  ====================================================
``state``          (episode, time, state_dim)           required; float, or integer for finite (tabular)
                                                        chains (a scalar state has ``state_dim`` of size 1)
``input``          (episode, time, input_dim)           optional; ``input[:, t]`` drives the step t -> t+1
``output``         (episode, time, output_dim)          optional measurements; NaN = missing
``cost``           (episode, time)                      optional float; cost of the step t -> t+1
``behavior_logp``  (episode, time)                      optional float; :math:`\log B(x_{t+1}\mid x_t)` of the
                                                        logged transition under the behaviour chain
``mask``           (episode, time)                      optional bool; True on the recorded states
``terminal_cost``  (episode,)                           optional float; paid at the last recorded state
=================  ===================================  ====================================================

Further data variables are allowed if their first dimension is ``episode``.

Conventions:

- **Time.** The coordinate ``time`` is required, 1-D, strictly increasing: float seconds (then the optional
  attribute ``dt`` is the sampling interval) or integer step indices.
- **Steps.** ``cost``, ``behavior_logp`` and ``input`` are per-transition: the value at time index ``t``
  belongs to the step :math:`x_t \to x_{t+1}`; the last time index is unused (NaN by convention).
- **Ragged episodes.** ``mask[e]`` is True on the recorded states of episode ``e`` and must have the form
  ``True...True False...False`` with ``mask[e, 0]`` True (an episode of length :math:`T_e` is a prefix). Step
  ``t`` belongs to the episode iff ``mask[e, t] & mask[e, t+1]``. Values outside these (padding) are ignored
  and may be NaN. Without ``mask`` every state and step is recorded. For simulated episodes that end in a
  terminal set the first absorbed state is recorded (the entering transition is part of the episode), i.e.
  ``mask[:, t] = (t == 0) | alive[:, t-1]`` with the engine's ``alive``.
- **Finiteness.** ``state`` must be finite wherever it is recorded, and ``cost``, ``behavior_logp``,
  ``input`` on every step of an episode; a dataset whose states end in NaN without a ``mask`` is rejected
  (ragged episodes need a mask).
- **Attributes.** ``pydso_schema_version`` (int, required, = 1), ``system`` (str, name of the system),
  ``parameters`` (JSON string: the parameters used), ``units`` (JSON string: object mapping variable names
  to unit strings), ``dt`` (optional positive float). Optional: ``state_shape`` (JSON list, the state's shape
  when it is not a vector; ``state`` holds it flattened), ``parameters_by_part`` (JSON, set by :func:`open`
  when appended batches were generated with different parameters).

Stores
------
A store is a directory with a manifest ``pydso.json`` and one zarr store per :func:`save` / :func:`append`
("part"), chunked by episode. :func:`append` writes a new part under a temporary name, renames it, then
atomically replaces the manifest, so a writer killed at any moment leaves the old or the old + new episodes
(see :mod:`pydso.data._store`). :func:`open` returns a lazy dask-backed dataset; :func:`iter_chunks` streams it.
Creating a store is atomic and exclusive (two processes appending to the same new store both keep their episodes).
The manifest records the size and BLAKE2b hash of every stored file: :func:`open` refuses a store with a missing or
truncated chunk, and ``validate(path)`` also checks the hashes, naming the store, part, variable and chunk.
"""

from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._schema import VARIABLE_DIMS as VARIABLE_DIMS
from ._schema import DatasetError as DatasetError
from ._schema import episode_lengths as episode_lengths
from ._schema import make_dataset as make_dataset
from ._schema import to_dataset as to_dataset
from ._schema import validate as validate
from ._store import append as append
from ._store import iter_chunks as iter_chunks
from ._store import open as open  # noqa: A004
from ._store import save as save

__all__ = [
    "SCHEMA_VERSION",
    "VARIABLE_DIMS",
    "DatasetError",
    "validate",
    "make_dataset",
    "to_dataset",
    "episode_lengths",
    "save",
    "append",
    "open",
    "iter_chunks",
]

from ._minari import from_minari as from_minari
from ._minari import to_minari as to_minari
from ._readers import ReaderError as ReaderError
from ._readers import from_csv as from_csv
from ._readers import from_mat as from_mat
from ._readers import from_npz as from_npz

__all__ += ["ReaderError", "from_csv", "from_npz", "from_mat"]
__all__ += ["from_minari", "to_minari"]
