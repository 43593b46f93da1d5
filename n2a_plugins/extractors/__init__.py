"""Built-in feature extractors for `n2a eval`: the FID Inception network and an offline one."""

from n2a_core import hookimpl
from n2a_plugins.extractors.inception import InceptionSpec, build_inception
from n2a_plugins.extractors.random_conv import RandomConvExtractor, RandomConvSpec


@hookimpl
def register_feature_extractors(register):
    register("inception", InceptionSpec, build_inception,
             "Inception-v3 pool3 features of FID papers (pytorch-fid's weights file; no download)")
    register("random-conv", RandomConvSpec, lambda spec, ctx: RandomConvExtractor(**spec.params()).to(ctx.device),
             "Offline: channel statistics of a seeded random conv network (colour, edges, texture)")
