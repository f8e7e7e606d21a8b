"""A tensor format applied as a linear map from its leading modes to the rest.

CP, Tucker and TT share this operator: each says how its factors are subscripted
(`ModeOperator._subscripts`) and in which order they are contracted
(`ModeOperator._operands`); applying, costing and counting FLOPs are written once here,
on top of `tensornets.contract`.
"""

from __future__ import annotations

import jax

from tensornets import contract as contract_lib

__all__ = ["ModeOperator"]


class ModeOperator:
    """Mixin: ``apply``, ``apply_costs`` and ``flops`` of a tensor (I_1, ..., I_N) used as a map.

    The first ``n_in`` modes are the input, the rest the output:
    y[..., i_{n+1}, ..., i_N] = sum_{i_1..i_n} x[..., i_1, ..., i_n] X[i_1, ..., i_N].

    A format using it has ``shape`` and ``ndim`` properties and defines
      ``_subscripts(n_in)``: ``(x_sub, operand_subs, w_sub, out_sub)``, the einsum subscripts
        of the input (batch letter first), of each operand, of the reconstructed tensor and of
        the output, for an ``n_in`` already checked to be in [1, N - 1];
      ``_operands()``: the factor arrays, in the order of ``operand_subs``.
    """

    def _subscripts(self, n_in: int) -> tuple:
        raise NotImplementedError

    def _checked_subscripts(self, n_in: int) -> tuple:
        if not 0 < n_in < self.ndim:
            raise ValueError(f"n_in must be in [1, {self.ndim - 1}], got {n_in}")
        return self._subscripts(n_in)

    def _operands(self) -> list:
        raise NotImplementedError

    def apply(self, x: jax.Array, n_in: int, method: str = "auto", precision=None) -> jax.Array:
        """Applies the tensor as a linear map from its first ``n_in`` modes to the rest.

        Contracted through the factors along an optimal path (``method="factorized"``),
        or by reconstruction and matmul (``"dense"``), or whichever has fewer FLOPs
        (``"auto"``); see `tensornets.contract`.

        Args:
          x: (..., I_1, ..., I_n).
          n_in: number of leading modes that are inputs, in [1, N - 1].
          method: "auto" | "factorized" | "dense".
          precision: passed to ``jnp.einsum``.

        Returns:
          (..., I_{n+1}, ..., I_N).

        Raises:
          ValueError: if ``x`` does not end with the input modes, or for a bad ``n_in``.
        """
        shape = self.shape
        in_shape = tuple(shape[:n_in])
        batch = x.shape[: x.ndim - n_in]
        if tuple(x.shape[x.ndim - n_in :]) != in_shape:
            raise ValueError(f"x.shape={x.shape} must end with the input modes {in_shape}")
        xb = x.reshape((-1, *in_shape))
        x_sub, subs, w_sub, out_sub = self._checked_subscripts(n_in)
        y = contract_lib.factorized_apply(
            xb, x_sub, subs, self._operands(), w_sub, out_sub, method, precision
        )
        return y.reshape(batch + tuple(shape[n_in:]))

    def apply_costs(self, batch: int, n_in: int) -> dict[str, int]:
        """FLOPs of `apply` on ``batch`` inputs, factorized and dense.

        Returns:
          As `tensornets.contract.factorized_apply_costs`.
        """
        x_sub, subs, w_sub, out_sub = self._checked_subscripts(n_in)
        shapes = [o.shape for o in self._operands()]
        return contract_lib.factorized_apply_costs(
            (batch, *self.shape[:n_in]), x_sub, subs, shapes, w_sub, out_sub
        )

    def flops(self, batch: int, n_in: int, method: str = "auto") -> int:
        """FLOPs of `apply` with ``method`` ("auto" = the cheaper one)."""
        costs = self.apply_costs(batch, n_in)
        return costs[contract_lib.choose_method(costs["factorized"], costs["dense"], method)]
