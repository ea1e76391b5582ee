// Fixture (b): two branches ("fast" and "slow"), each with a phase-1 shell task and a
// phase-2 shell task that uses its own phase-1 output. The slow branch takes longer in
// both phases.
//
// Written as one ctx.parallel.all per phase (a barrier between the phases) on purpose:
// in @a5c-ai/babysitter-sdk 0.0.187 step ids come from one replay counter and
// ctx.parallel.all runs its thunks one after another, so a branch doing two sequential
// ctx.task calls inside one ctx.parallel.all shifts the step ids of the branches after it
// and the SDK re-requests their pending task as a duplicate effect (see
// two_phase_pipelined.mjs). Phase-2 tasks are therefore requested only after both
// phase-1 tasks are resolved.
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command, timeout: 30000 },
}));

const text = (result) => (typeof result === "string" ? result.trim() : JSON.stringify(result));

export async function process(inputs, ctx) {
  const durations = inputs?.durations ?? { fast: [0.2, 0.2], slow: [1, 0.5] };
  const step = (name, seconds, extra = "") => () =>
    ctx.task(
      shellStep,
      { title: name, command: `sleep ${seconds} && echo ${name}${extra}` },
      { label: name },
    );
  const [fast1, slow1] = await ctx.parallel.all([
    step("fast-phase1", durations.fast[0]),
    step("slow-phase1", durations.slow[0]),
  ]);
  const [fast2, slow2] = await ctx.parallel.all([
    step("fast-phase2", durations.fast[1], ` after ${text(fast1)}`),
    step("slow-phase2", durations.slow[1], ` after ${text(slow1)}`),
  ]);
  return { fast: [text(fast1), text(fast2)], slow: [text(slow1), text(slow2)] };
}
