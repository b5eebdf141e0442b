"""Probes: each measures one thing it is handed and returns a typed record (see `records`).

Nothing here imports a method by name: a module that computes matmuls outside `nn.Linear` says what they cost
through its own `analytic_flops`, and everything else is read from tensors, hooks and the operating system.
"""
