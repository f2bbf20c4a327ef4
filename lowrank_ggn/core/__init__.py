"""The exact pipeline: model → loss-Hessian factors → path → linearisation → Gram → spectrum.

=============================  ==================================================
module                         stage
=============================  ==================================================
:mod:`.inputs`                 tensor, tuple or dict inputs; which entries are per-sample
:mod:`.model`                  the model as a function ``F(θ, X)`` of its parameters
:mod:`.state`                  the guarantee that the model is never changed
:mod:`.validation`             argument checks at every public entry
:mod:`.budget`                 the memory budget and its checks
:mod:`.tolerances`             every tolerance, named
:mod:`.autodiff`               per-sample VJPs, one-hot cotangents, batch JVPs
:mod:`.loss_factors`           ``S_n`` with ``S_n S_nᵀ = ∇²_{F_n} L`` (closed forms)
:mod:`.losses`                 one class per closed-form loss, the registry, the autodiff loss
:mod:`.loss_hessians`          per-sample Hessians, ``eigh`` square roots, sketches
:mod:`.loss_targets`           targets that fit outputs and loss
:mod:`.loss_sampling`          Monte-Carlo factors
:mod:`.paths`                  per-sample or full-batch: does the model mix samples?
:mod:`.linearization`          the forward pass with its graph; ``Jᵀ`` and ``V`` products
:mod:`.engine`                 the layer-wise Gram engine and its strategies
:mod:`.gram`                   ``Vᵀ V`` from a linearisation
:mod:`.spectrum`               eigenpairs of the Gram, eigenvectors ``V u / √λ``
:mod:`.solvers`, :mod:`.lanczos`  dense ``eigh`` or matrix-free Lanczos
:mod:`.precision`              the error model; which eigenvalues are resolved
=============================  ==================================================
"""
