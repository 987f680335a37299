"""mace-ray: orchestration of MACE (mace_core) on one machine or a Ray cluster.

No maths here: this package moves mace_core calls, their inputs and their outputs
between storage, processes and machines.
"""
