r"""Losses: one class per closed-form loss, a registry, the autodiff loss beside them.

==================================  =================================================
module                              what it holds
==================================  =================================================
:mod:`.base`                        :class:`ClosedFormLoss`: targets check, ``ρ``,
                                    ``C``, factors, sampled factors; shared checks
:mod:`.cross_entropy`               ``CrossEntropyLoss`` (per position)
:mod:`.squared_error`               ``MSELoss``
:mod:`.binary_cross_entropy`        ``BCEWithLogitsLoss``
:mod:`.registry`                    the closed forms by type; any other loss
                                    wrapped as :class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss`
:mod:`.autodiff`                    :class:`AutodiffLoss`: any loss through autodiff
                                    Hessians, and its per-sample structure check
==================================  =================================================

The dispatch over them is :mod:`lowrank_ggn.core.loss_factors` (exact),
:mod:`lowrank_ggn.core.loss_sampling` (Monte-Carlo) and
:mod:`lowrank_ggn.core.loss_targets` (targets), each calling the loss's class or,
for the autodiff loss, :mod:`lowrank_ggn.core.loss_hessians`.
"""
