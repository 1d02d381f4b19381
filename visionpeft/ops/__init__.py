"""Pure tensor code below every other layer: transforms (dwt), low-rank and Kronecker
products, SNELL's kernels, compiled and native kernel plumbing and the kernel switch
(`kernels`). Nothing here imports the rest of visionpeft."""
