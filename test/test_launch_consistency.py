"""launch/policy.launch.py and `daptq launch` start the same graph: executables, node names,
params file, remappings and the artifact_dir parameter (launch_ros cannot run here: the file is
checked with ast)."""

import ast

from test_ros_support import REPO

from daptq_ros import launcher

LAUNCH = REPO / "launch" / launcher.LAUNCH_FILE


def _module():
    return ast.parse(LAUNCH.read_text())


def _literal(tree, name):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not a literal module-level assignment in {LAUNCH}")


def _node_calls(tree):
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Node"]
    return {next(k.value.value for k in c.keywords if k.arg == "name"): c for c in calls}


def test_launch_file_is_valid_python_with_entry_point():
    tree = _module()
    funcs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert "generate_launch_description" in funcs
    imported = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"Node", "DeclareLaunchArgument", "LaunchConfiguration", "IfCondition"} <= imported


def test_same_package_params_file_and_executables():
    tree = _module()
    assert _literal(tree, "PACKAGE") == launcher.PACKAGE
    assert _literal(tree, "PARAMS_FILE") == launcher.DEFAULT_PARAMS
    assert (REPO / launcher.DEFAULT_PARAMS).is_file()
    assert _literal(tree, "NODES") == launcher.NODES
    calls = _node_calls(tree)
    assert set(calls) == set(launcher.NODES)
    setup_py = (REPO / "setup.py").read_text()
    for name, exe in launcher.NODES.items():
        assert f'"{exe}": "{launcher.NODE_MODULES[name]}:main"' in setup_py


def test_same_remappings():
    tree = _module()
    topics = _literal(tree, "TOPICS")
    for node, const in (("policy_node", "POLICY_REMAPPINGS"), ("sim_bridge", "SIM_REMAPPINGS")):
        resolved = [(src, topics[arg][0]) for src, arg in _literal(tree, const)]
        assert resolved == launcher.REMAPPINGS[node], node
        call = _node_calls(tree)[node]
        remap = next(k.value for k in call.keywords if k.arg == "remappings")
        assert const in ast.unparse(remap)


def test_launch_arguments_declared_with_descriptions():
    tree = _module()
    declared = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DeclareLaunchArgument":
            name = ast.unparse(call.args[0]) if call.args else None
            declared[name] = {k.arg for k in call.keywords}
    for arg in ("artifact_dir", "params_file", "namespace", "use_sim_time", "sim"):
        assert repr(arg) in declared or f"'{arg}'" in declared, arg
        assert "description" in declared.get(repr(arg), set()), arg
    policy = ast.unparse(_node_calls(tree)["policy_node"])
    assert "'artifact_dir': artifact_dir" in policy and "params_file" in policy


def test_launcher_command_uses_params_file_and_remaps(tmp_path):
    files = [REPO / launcher.DEFAULT_PARAMS, tmp_path / "o.yaml"]
    argv = launcher.node_command("policy_node", files, "robot1")
    assert argv[1:3] == ["-m", "daptq_ros.nodes.policy_node"]
    assert argv[argv.index("--params-file") + 1] == str(files[0])
    assert "__ns:=/robot1" in argv and "__node:=policy_node" in argv
    for src, dst in launcher.REMAPPINGS["policy_node"]:
        assert f"{src}:={dst}" in argv
    launcher.write_overrides({"policy_node": {"artifact_dir": "/a"}, "sim_bridge": {}}, files[1])
    assert "/**/policy_node" in files[1].read_text() and "sim_bridge" not in files[1].read_text()
