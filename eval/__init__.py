"""sf-eval: a bundle's accuracy on a multiple-choice video benchmark, and with a reference checkpoint how far the
export moved its answers. Torch-free except the reference side, which is imported only when asked for."""
