// Counter-example kept to pin an SDK limitation (see two_phase.mjs): each branch runs its
// two tasks in sequence *inside* one ctx.parallel.all. With @a5c-ai/babysitter-sdk 0.0.187,
// once "a-phase1" is resolved, the next iteration requests no "a-phase2" but lists
// "b-phase1" twice: the original effect and a duplicate with a new effectId.
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command, timeout: 30000 },
}));

export async function process(inputs, ctx) {
  const branch = (name) => async () => {
    const first = await ctx.task(
      shellStep,
      { title: `${name}-phase1`, command: `echo ${name}-phase1` },
      { label: `${name}-phase1` },
    );
    const second = await ctx.task(
      shellStep,
      { title: `${name}-phase2`, command: `echo ${name}-phase2` },
      { label: `${name}-phase2` },
    );
    return [first, second];
  };
  return await ctx.parallel.all([branch("a"), branch("b")]);
}
