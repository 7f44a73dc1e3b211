"""
Independent float64 reference of MORA's policy losses, written from the formulas (DESIGN.md,
"The MORA loop", step 5) and differentiated by JAX, end to end through the model oracle
(model_jax.py): nothing here knows how the C code turns the losses into per-token weights.

    token log-probs   logp[b, t] = log softmax(logits[b, t])[targets[b, t]]
    GRPO / PPO        A_b = (r_b - mean_group) / (std_group + eps)   (population std; 0 for a
                      group of equal rewards)
                      ratio = exp(logp - logp_old)
                      k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1
                      obj = min(ratio A, clip(ratio, 1-eps, 1+eps) A) - beta k3
                      loss = -mean over sequences with response tokens of the
                             mean of obj over the sequence's response tokens (mask 1)
    DPO               pi = sum_t mask * logp per sequence; rows 2i chosen, 2i+1 rejected
                      u = beta ((pi_c - ref_c) - (pi_r - ref_r)); loss = mean(-log sigmoid(u))

Functions return the loss, d loss / d logp (B, T), and d loss / d parameters (a dict under the
Hugging Face names of model_jax.py).
"""
import numpy as np
import jax
import jax.numpy as jnp

import model_jax

jax.config.update("jax_enable_x64", True)


def group_advantages(rewards, G, eps):
    r = np.asarray(rewards, np.float64).reshape(-1, G)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    adv = np.where(std > 0, (r - mean) / (std + eps), 0.0)
    return adv.reshape(-1)


def token_logprobs(logits, targets):
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]


def ppo_loss_of_logp(logp, logp_old, logp_ref, mask, adv, clip_eps, beta):
    ratio = jnp.exp(logp - logp_old)
    A = adv[:, None]
    policy = jnp.minimum(ratio * A, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * A)
    diff = logp_ref - logp
    k3 = jnp.exp(diff) - diff - 1.0
    obj = (policy - beta * k3) * mask
    n = mask.sum(axis=1)
    has = n > 0
    per_seq = jnp.where(has, obj.sum(axis=1) / jnp.where(has, n, 1.0), 0.0)
    return -per_seq.sum() / has.sum()


def ppo_kl_and_clip(logp, logp_old, logp_ref, mask, adv, clip_eps):
    """k3 averaged like the loss, and the share of response tokens whose clipped term is the
    smaller (the policy term passes no gradient there)."""
    logp, logp_old, logp_ref, mask = map(np.asarray, (logp, logp_old, logp_ref, mask))
    diff = logp_ref - logp
    k3 = (np.exp(diff) - diff - 1.0) * mask
    n = mask.sum(axis=1)
    kl = np.mean([k3[b].sum() / n[b] for b in range(len(n)) if n[b] > 0])
    ratio = np.exp(logp - logp_old)
    A = np.asarray(adv)[:, None]
    clipped = (np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * A < ratio * A) & (mask > 0)
    return float(kl), float(clipped.sum() / (mask > 0).sum())


def dpo_loss_of_logp(logp, mask, ref_seq, beta):
    seq = (logp * mask).sum(axis=1)
    pi_c, pi_r = seq[0::2], seq[1::2]
    ref_c, ref_r = ref_seq[0::2], ref_seq[1::2]
    u = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    return -jax.nn.log_sigmoid(u).mean()


def _model_logp(params, spec, inputs, targets):
    return token_logprobs(model_jax._logits(params, spec, inputs), targets)


def ppo(params, cfg, inputs, targets, mask, logp_old, logp_ref, rewards, G, clip_eps, beta, adv_eps):
    """dict(loss, logp, dlogp, grads, adv, kl, clip_frac) of the GRPO/PPO loss."""
    spec = model_jax.spec_from_config(cfg)
    p = model_jax.to_jax(params)
    inputs, targets = jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)
    mask, logp_old, logp_ref = (jnp.asarray(x, jnp.float64) for x in (mask, logp_old, logp_ref))
    adv = jnp.asarray(group_advantages(rewards, G, adv_eps))
    logp = _model_logp(p, spec, inputs, targets)
    loss, dlogp = jax.value_and_grad(ppo_loss_of_logp)(logp, logp_old, logp_ref, mask, adv, clip_eps, beta)

    def full(p_):
        return ppo_loss_of_logp(_model_logp(p_, spec, inputs, targets), logp_old, logp_ref, mask, adv, clip_eps, beta)

    grads = jax.grad(full)(p)
    kl, clip_frac = ppo_kl_and_clip(logp, logp_old, logp_ref, mask, adv, clip_eps)
    return dict(loss=float(loss), logp=np.asarray(logp), dlogp=np.asarray(dlogp),
                grads={k: np.asarray(g) for k, g in grads.items()}, adv=np.asarray(adv),
                kl=kl, clip_frac=clip_frac)


def dpo(params, cfg, inputs, targets, mask, ref_seq, beta):
    """dict(loss, logp, dlogp, grads) of the DPO loss."""
    spec = model_jax.spec_from_config(cfg)
    p = model_jax.to_jax(params)
    inputs, targets = jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)
    mask, ref_seq = jnp.asarray(mask, jnp.float64), jnp.asarray(ref_seq, jnp.float64)
    logp = _model_logp(p, spec, inputs, targets)
    loss, dlogp = jax.value_and_grad(dpo_loss_of_logp)(logp, mask, ref_seq, beta)
    grads = jax.grad(lambda p_: dpo_loss_of_logp(_model_logp(p_, spec, inputs, targets), mask, ref_seq, beta))(p)
    return dict(loss=float(loss), logp=np.asarray(logp), dlogp=np.asarray(dlogp),
                grads={k: np.asarray(g) for k, g in grads.items()})
