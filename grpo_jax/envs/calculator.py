"""The calculator-tool task: the model may call a calculator, then answers `<answer>N</answer>`.

Questions come from the arithmetic generator ("What is 347 * 29?"; difficulty "medium"
by default, 2-3 digit multiplication, where a small model needs the tool).  The compact
protocol, for tiny models, is three short turns:

    assistant: <calc>347*29</calc>
    tool:      10063
    assistant: <answer>10063</answer>

`tool_format="json"` uses `<tool_call>{"name": "calculator", "arguments": {"expression":
"347*29"}}</tool_call>` instead, the tool described in the system prompt; `tool_format="native"`
gives the tool's schema to the chat template (`ToolEnv(native_tools=True)`) and reads the calls
in the model's own format (Qwen `<tool_call>` tags or Llama 3.1 JSON).  The calculator evaluates + - * / // % ** and parentheses
exactly with an AST walk (`safe_math`), never `eval`.

Rubric (default weights): correct_answer 1.0 (numeric match of the final `<answer>`),
strict_format 0.2 (the final message is exactly `<answer>N</answer>`), tool_used 0.1 (at
least one call, none failed); tool_calls and tool_errors are logged with weight 0.
"""

from __future__ import annotations

from typing import Any

from grpo_jax.envs.arithmetic import ArithmeticSpec, make_problem, spec_for
from grpo_jax.envs.base import Row
from grpo_jax.envs.procedural import DEFAULT_ROWS, generate_rows
from grpo_jax.envs.safe_math import evaluate
from grpo_jax.envs.tool_env import ToolEnv
from grpo_jax.envs.tools import JSONToolCallParser, TagToolCallParser
from grpo_jax.rubrics.numbers import format_number
from grpo_jax.rubrics.parsers import XMLParser, answer_parser
from grpo_jax.rubrics.rewards import (correct_answer, format_reward, tool_calls_metric, tool_errors_metric,
                                      tool_used)
from grpo_jax.rubrics.rubric import Rubric


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses."""
    return format_number(evaluate(expression))


def calculator_rubric(parser: XMLParser) -> Rubric:
    return Rubric([correct_answer(parser), format_reward(parser), tool_used(), tool_calls_metric(),
                   tool_errors_metric()], [1.0, 0.2, 0.1, 0.0, 0.0], parser=parser)


COMPACT_SYSTEM_PROMPT = "Use <calc>EXPRESSION</calc> to compute. Answer as <answer>NUMBER</answer>."
NATIVE_SYSTEM_PROMPT = "Use the calculator tool to compute. Answer as <answer>NUMBER</answer>."


class CalculatorEnv(ToolEnv):
    """Arithmetic questions with a calculator tool.

    Args:
      difficulty: "easy", "medium", "hard" or an `ArithmeticSpec`.
      tool_format: "compact" (`<calc>...</calc>`), "json" (`<tool_call>{...}</tool_call>`) or
        "native" (schemas through the chat template, the model's own call format).
      max_turns: assistant turns (tool turns plus the answer).
      Other keyword arguments go to `ToolEnv` / `Environment`.
    """
    name = "calculator"

    def __init__(self, difficulty: str | ArithmeticSpec = "medium", *, tool_format: str = "compact",
                 max_turns: int = 3, parser: XMLParser | None = None, test_fraction: float = 0.1,
                 **kwargs: Any):
        self.spec = spec_for(difficulty)
        self.test_fraction = test_fraction
        if tool_format == "compact":
            call_parser = TagToolCallParser("calc", "calculator", "expression")
            kwargs.setdefault("system_prompt", COMPACT_SYSTEM_PROMPT)
        elif tool_format == "json":
            call_parser = JSONToolCallParser()
        elif tool_format == "native":
            call_parser = kwargs.pop("call_parser", "auto")
            kwargs.setdefault("native_tools", True)
            kwargs.setdefault("system_prompt", NATIVE_SYSTEM_PROMPT)
        else:
            raise ValueError(f"tool_format must be 'compact', 'json' or 'native', got {tool_format!r}")
        parser = parser or answer_parser()
        kwargs.setdefault("rubric", calculator_rubric(parser))
        super().__init__([calculator], call_parser=call_parser, max_turns=max_turns, parser=parser, **kwargs)

    def dataset(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """`n` (default `DEFAULT_ROWS`) distinct generated rows of "train" or "test", fixed by `seed`."""
        rows = generate_rows(lambda rng: make_problem(rng, self.spec), split,
                             DEFAULT_ROWS if n is None else n, seed, test_fraction=self.test_fraction)
        return [self._with_task(r) for r in rows]

    def no_tool_completion(self, row: Row) -> list[dict[str, str]]:
        """An answer that skips the tool and restates the expression unevaluated
        (`<answer>347*29</answer>`): well formed, never correct. Warm-start data mixes it with
        `gold_completion` so that RL has a tool-use decision left to learn."""
        expression = row["info"]["expression"].replace(" ", "")
        return [{"role": "assistant", "content": self.parser.format(answer=expression)}]

    def gold_completion(self, row: Row) -> list[dict[str, str]]:
        """Call the calculator on the question's expression, then answer with its result."""
        expression = row["info"]["expression"].replace(" ", "")
        result = calculator(expression)
        call = self.call_parser.format_call("calculator", {"expression": expression})
        return [{"role": "assistant", "content": call},
                {"role": "tool", "content": result},
                {"role": "assistant", "content": self.parser.format(answer=result)}]
