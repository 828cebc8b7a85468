"""Flover: serve autoregressive models to requests arriving at random times, fused into one running batch."""

from effdl.flover.engine import Engine
from effdl.flover.kvpool import plan_shuffle
from effdl.flover.request import RequestOutput, SamplingParams
from effdl.flover.scheduler import POLICIES, QueueFull

__all__ = ["POLICIES", "Engine", "QueueFull", "RequestOutput", "SamplingParams", "plan_shuffle"]
