"""The circuit graph: populations, the projections between them, and the network built from them.

`schema` (the networkx graph's nodes, edges and their attributes; needs networkx only, not torch, so that
`analysis` rebuilds a recorded circuit without torch), `activations`, `population`, `projections` (Dense,
Conv2d, batch norm, pooling, ...), `operations` (torch functions between populations, junctions), `feedback`
(direct feedback projections), `circuit` (building a Circuit) and `network` (the built CircuitNet). This
package's own import loads none of them, so it stays torch-free; the public names are `circuits.Circuit`,
`circuits.Population`, `circuits.Dense`, ...
"""
