"""Environments: the `Environment` protocol, single-turn, multi-turn and tool envs, task groups.

Tasks: `arithmetic.ArithmeticEnv`, `countdown.CountdownEnv`, `calculator.CalculatorEnv`
(calculator tool), `gsm8k.GSM8KEnv` (TFDS, no TensorFlow; imported on use since it loads
tensorflow_datasets); `agent.AgentEnv` trains the user's own agent code (openai SDK).
`sandbox.run_python` runs model-written code in a separate process.
By name: `registry.make_env(name, **kwargs)`; `registry.register_env(name, factory)` adds one.
"""

from grpo_jax.envs.agent import AgentEnv, make_client
from grpo_jax.envs.agent_trajectory import AgentTrajectory, assemble
from grpo_jax.envs.base import (Environment, Episode, MultiTurnEnv, SingleTurnEnv, replay_episodes,
                                respond_all, run_episode, run_episodes)
from grpo_jax.envs.env_group import EnvGroup, GroupRubric
from grpo_jax.envs.registry import make_env, register_env
from grpo_jax.envs.tool_env import ToolEnv
from grpo_jax.envs.tool_calls import make_call_parser, parser_for_tokenizer
from grpo_jax.envs.tools import (FromState, JSONToolCallParser, LocalHandle, TagToolCallParser, Tool, ToolCall,
                                 ToolResult, execute_tool_call, python_tool)

__all__ = [
    "Environment", "SingleTurnEnv", "MultiTurnEnv", "ToolEnv", "EnvGroup", "GroupRubric", "Episode",
    "run_episode", "run_episodes", "replay_episodes", "respond_all",
    "Tool", "ToolCall", "ToolResult", "JSONToolCallParser", "TagToolCallParser", "execute_tool_call",
    "python_tool", "make_env", "register_env", "FromState", "LocalHandle", "make_call_parser",
    "parser_for_tokenizer", "AgentEnv", "AgentTrajectory", "assemble", "make_client",
]
