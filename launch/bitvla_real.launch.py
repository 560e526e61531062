"""bitvla_node on a real arm (MoveIt Servo twist commands by default). Safe by default: dry_run is
true, so commands go to ~/dry_run/command until you set dry_run:=false deliberately.

    ros2 launch bitvla_ros bitvla_real.launch.py model_path:=/models/libero_spatial.bitvla \
        camera_topic:=/camera/color/image_raw dry_run:=false
    ros2 launch bitvla_ros bitvla_real.launch.py model_path:=M \
        config:=$(ros2 pkg prefix bitvla_ros)/share/bitvla_ros/config/ur_joint_trajectory.yaml

Arguments:
    model_path          checkpoint directory or packed .bitvla file (required)
    config              parameter file (default: the package's config/real_arm.yaml); profiles:
                        franka_servo.yaml, ur_joint_trajectory.yaml
    camera_topic        third-person camera (Image or CompressedImage: the transport is found by
                        type); empty: the parameter file's
    wrist_camera_topic  wrist camera; empty: the parameter file's
    command_topic       where commands go when dry_run is false; empty: the parameter file's
    dry_run             true: publish only on ~/dry_run/command
    use_sim_time        false: wall clock on a real robot

A process that fails (a bad argument or parameter, a checkpoint that does not load) ends the
launch with exit status 1 after its error.
"""

import os
import sys

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bitvla_launch_common import bitvla_node_action  # noqa: E402


def generate_launch_description():
    share = get_package_share_directory("bitvla_ros")
    return LaunchDescription([
        DeclareLaunchArgument("model_path", description="checkpoint directory or .bitvla file"),
        DeclareLaunchArgument("config", default_value=os.path.join(share, "config", "real_arm.yaml"),
                              description="bitvla_node parameter file"),
        DeclareLaunchArgument("camera_topic", default_value="",
                              description="third-person camera topic (empty: the parameter file's)"),
        DeclareLaunchArgument("wrist_camera_topic", default_value="",
                              description="wrist camera topic (empty: the parameter file's)"),
        DeclareLaunchArgument("command_topic", default_value="",
                              description="command topic (empty: the parameter file's)"),
        DeclareLaunchArgument("dry_run", default_value="true",
                              description="true: commands only on ~/dry_run/command"),
        DeclareLaunchArgument("use_sim_time", default_value="false"),
        bitvla_node_action(),
    ])
