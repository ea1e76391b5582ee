// Fixture (a): three parallel shell tasks of different lengths, requested in one
// iteration (one ctx.parallel.all batch: same schedulerHints.parallelGroupId).
// inputs.durations (seconds, three numbers) overrides the default 0.2 / 1 / 2.
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command, timeout: 30000 },
}));

export async function process(inputs, ctx) {
  const [d0, d1, d2] = inputs?.durations ?? [0.2, 1, 2];
  const step = (name, seconds) => () =>
    ctx.task(shellStep, { title: name, command: `sleep ${seconds} && echo ${name}` }, { label: name });
  const [short, medium, long] = await ctx.parallel.all([
    step("short", d0),
    step("medium", d1),
    step("long", d2),
  ]);
  return { short, medium, long };
}
