"""Flax users: a linen module whose parameter *is* jaxgen's param tree, so a model trained as a Flax
module hands its params straight to jaxgen's generate (and back), with no conversion.

    variables = JaxgenLM(cfg).init(key, tokens, positions)
    params = variables["params"]["lm"]            # a jaxgen.Params pytree
    jaxgen.generate(jaxgen.Model(cfg, params), prompts)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxgen


class JaxgenLM(nn.Module):
    cfg: jaxgen.ModelConfig

    @nn.compact
    def __call__(self, tokens, positions):
        """Logits [B, T, V] for a full (teacher-forced) pass: what a Flax training loop calls."""
        params = self.param("lm", lambda key: jaxgen.init_params(self.cfg, key))
        cache = jaxgen.init_cache(self.cfg, tokens.shape[0], tokens.shape[1], params.embed.dtype)
        logits, _ = jaxgen.forward(params, tokens, positions, cache, self.cfg)
        return logits


if __name__ == "__main__":
    cfg = jaxgen.load_config("smollm2-135m").replace(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                                                     d_ff=128, vocab_size=256, name="tiny")
    tokens = jnp.array([[1, 2, 3, 4]], jnp.int32)
    variables = JaxgenLM(cfg).init(jax.random.key(0), tokens, jnp.arange(4)[None])
    out = jaxgen.generate(jaxgen.Model(cfg, variables["params"]["lm"]), [[1, 2, 3, 4]], max_new_tokens=8)
    print(out[0].tokens)
