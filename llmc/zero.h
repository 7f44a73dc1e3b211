/*
 * ZeRO-1 for the CPU model: the AdamW moments sharded over the ranks (llmc/comm.h). Rank r keeps
 * the moments of its contiguous shard [lo, hi) of the parameter buffer (comm_shard_range) and
 * updates only those parameters; the updated shards are then all-gathered, so every rank holds
 * the whole parameters again. The AdamW arithmetic of every element is exactly the unsharded
 * update's (model_adamw_update), so the parameters are the same bits as without sharding; only
 * where the moments live changes (1/W of them per rank).
 *
 *   AdamWShard shard;
 *   adamw_shard_init(&shard, &model, comm_rank(), comm_world());   // after loading the model
 *   ... all-reduced gradients in model.grads ...
 *   adamw_shard_update(&model, &shard, lr, beta1, beta2, eps, weight_decay, grad_scale);
 *   adamw_shard_gather(&shard, &model, 0);   // before a checkpoint: whole moments on rank 0
 *   if (comm_rank() == 0) save(&model);
 *   adamw_shard_release(&model);             // the gathered copy is dropped again
 */
#ifndef LLMC_ZERO_H
#define LLMC_ZERO_H
#include <stddef.h>
#include "model.h"

typedef struct {
    size_t lo, hi;   // this rank's elements of the parameter buffer
    float *m, *v;    // (hi - lo) each; NULL until the first update when no state was loaded
} AdamWShard;

// This rank's shard of the model's parameters. When the model already holds AdamW moments (a
// resumed checkpoint), the shard keeps its slice of them and the model's whole copy is freed.
void adamw_shard_init(AdamWShard *shard, Model *model, int rank, int world);
// model_adamw_update on the shard's elements only (model->grads must be the whole, reduced
// gradient), then the parameters are all-gathered over the ranks. model->opt_step advances.
void adamw_shard_update(Model *model, AdamWShard *shard, float lr, float beta1, float beta2, float eps,
                        float weight_decay, float grad_scale);
// Collective: gathers every rank's moments into model->m / model->v (allocated here) on rank
// root, for a checkpoint that holds the whole state; the other ranks' model->m / v stay NULL.
void adamw_shard_gather(const AdamWShard *shard, Model *model, int root);
// Frees the whole moments adamw_shard_gather put in the model.
void adamw_shard_release(Model *model);
void adamw_shard_free(AdamWShard *shard);
#endif
