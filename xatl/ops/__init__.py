"""Sequence ops of the mixers, each with a pure-PyTorch reference and a one-token step.

One convention for all of them (flash-linear-attention's): every op returns `(output, final_state)`.
The whole-sequence forms take `initial_state` and `output_final_state` (the final state is None
unless asked for); the one-token steps (`*_step`) always return the new state, and leave the one
they were given as it was.
"""
