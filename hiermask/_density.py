"""The contract between an engine and the sampler: a flat density.

An engine hands the runner a :class:`FlatDensity`: minus the log density of
one flat unconstrained vector, the map back to the reported sites, and where
chains start. The runner and the NUTS kernel know nothing else about a model.
:func:`numpyro_density` builds one from any NumPyro model (the direct
engine); the collapsed engine writes its own
(:func:`hiermask._collapsed.collapsed_density`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, trace
from numpyro.infer.util import constrain_fn, potential_energy

__all__ = ["INIT_RADIUS", "FlatDensity", "numpyro_density"]

#: Half-width of the uniform initialization box in unconstrained space
#: (Stan's and NumPyro's).
INIT_RADIUS = 2.0


class FlatDensity(NamedTuple):
    """A posterior over one flat unconstrained vector.

    Attributes
    ----------
    size : int
        Length of the unconstrained vector.
    potential : callable
        ``potential(z) -> scalar``: minus the log density of ``z`` (log
        Jacobians of the transforms included), up to a constant.
    constrain : callable
        ``constrain(z) -> dict``: the value of every reported site.
    init_center, init_radius : array of shape (size,), optional
        Chains start uniformly in ``init_center +- init_radius``; by default
        in ``+-INIT_RADIUS`` around 0, as Stan and NumPyro do.
    init_variance : array of shape (size,), optional
        Known posterior variances, for the first warmup metric; NaN (and by
        default every coordinate) where unknown: the metric then comes from
        the gradient at the starting point.
    dense_metric : bool, default=False
        Warmup adapts a dense mass matrix (the posterior covariance of the
        flat vector) instead of a diagonal one: for a small vector whose
        coordinates correlate a posteriori, where it shortens trajectories
        (Stan's and NumPyro's ``dense_mass``). It costs ``size ** 2`` per
        leapfrog step and ``size ** 3`` where a warmup window ends.
    """

    size: int
    potential: Callable
    constrain: Callable
    init_center: Any = None
    init_radius: Any = None
    init_variance: Any = None
    dense_metric: bool = False

    def initial_points(self, unit):
        """Starting points from uniforms on [0, 1) of shape (chains, size).

        Parameters
        ----------
        unit : array of shape (n_chains, size)

        Returns
        -------
        array of shape (n_chains, size)
        """
        center = 0.0 if self.init_center is None else self.init_center
        radius = INIT_RADIUS if self.init_radius is None else self.init_radius
        return center + radius * (2.0 * unit - 1.0)


def numpyro_density(model, args):
    """The posterior of a NumPyro model as a :class:`FlatDensity`.

    Through NumPyro's ``potential_energy`` over the raveled unconstrained
    latent sites (NumPyro's transforms and log Jacobians).

    Parameters
    ----------
    model : callable
        A NumPyro model.
    args : tuple
        Its arguments.

    Returns
    -------
    FlatDensity
    """
    prototype = trace(seed(model, rng_seed=0)).get_trace(*args)
    unconstrained = {
        name: biject_to(site["fn"].support).inv(site["value"])
        for name, site in prototype.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    flat, unravel = ravel_pytree(unconstrained)

    def potential(z):
        return potential_energy(model, args, {}, unravel(z))

    def constrain(z):
        return constrain_fn(model, args, {}, unravel(z), return_deterministic=True)

    return FlatDensity(flat.shape[0], potential, constrain)
