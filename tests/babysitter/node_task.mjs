// Node-task fixture: one nodeTask (taskDef.node = {entry, args, env, cwd, timeoutMs}).
// inputs: {entry: "/abs/script.mjs", cwd: "/abs/dir"}.
import { nodeTask } from "@a5c-ai/babysitter-sdk";

const hello = nodeTask("hello-node", {
  title: "hello from node",
  entry: (args) => args.entry,
  args: (args) => ["--name", args.name],
  env: { GREETING: "hi", API_TOKEN: "dropped-by-the-sdk" },
  cwd: (args) => args.cwd,
  timeoutMs: 20000,
});

export async function process(inputs, ctx) {
  const result = await ctx.task(hello, { entry: inputs.entry, cwd: inputs.cwd, name: "effectd" });
  return { result };
}
